"""Data: the VQA v2 reader (:mod:`.vqa`), the synthetic shapes dataset (:mod:`.shapes`), splits
(:mod:`.splits`), QA shards (:mod:`.shards`), tokenizers (:mod:`.tokens`) and the training/eval
stream joined with the caches (:mod:`.stream`, :mod:`.batch`, :mod:`.preflight`); the ViT run on
image files instead of the cache (:mod:`.online`)."""
