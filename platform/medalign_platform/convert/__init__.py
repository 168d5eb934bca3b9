"""Converters from released checkpoint layouts to the layouts the platform loads.

* :mod:`.llava_med` -- an original-layout LLaVA-Med v1.5 (``model_type: llava_mistral``)
  into a transformers ``LlavaForConditionalGeneration`` folder with its processor;
* :mod:`.unimed_clip` -- a UniMed-CLIP ``.pt`` (open_clip fork) into an upstream open_clip
  ``local-dir`` with safetensors.

Both read their sources lazily and account for every source tensor (:mod:`.sources`).
"""
