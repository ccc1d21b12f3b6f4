"""The console scripts: ``vqa-data`` (:mod:`.data`), ``fuse-train`` (:mod:`.train`), ``fuse-eval``
(:mod:`.eval`), ``fuse-sweep`` (:mod:`.sweep`), ``fuse-quickstart`` (:mod:`.quickstart`); what they
share is in :mod:`.common` and :mod:`.options`. No CLI imports another."""
