"""One run: typed settings, config composition, the training loop and its shared pieces,
checkpoints, evaluation, the in-process runner, Ray Train, TensorBoard, storage and export."""
