"""Files: atomic writes and verified caches, the patch format, LoRA export, data-file locations and JSON records."""
