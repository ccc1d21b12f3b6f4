"""Metrics: the official VQA v2 accuracy and exact match (:mod:`.vqa`)."""
