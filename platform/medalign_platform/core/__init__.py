"""The MedAlign method: losses, the frozen teacher and its target cache, the student with LoRA,
the layer-L tap and the objective. Depends only on ``common``; usable as a library without Ray."""
