"""Stage 2 data: VQA v2 reader (:mod:`.vqa`), synthetic shapes (:mod:`.shapes`), splits (:mod:`.splits`),
QA shards (:mod:`.shards`), the training/eval stream joined with the caches (:mod:`.stream`,
:mod:`.batch`, :mod:`.preflight`, :mod:`.tokens`), the VQA metric (:mod:`.metric`), the ``vqa-data``
CLI (:mod:`.data_cli`). Importing the package imports none of them (no torch at import time)."""
