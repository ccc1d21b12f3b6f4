"""Training: the run's settings (:mod:`.config`), its model, optimizer and schedule (:mod:`.model`),
its streams (:mod:`.streams`), the loop (:mod:`.loop`), checkpoints (:mod:`.checkpoint`) and scoring
(:mod:`.evaluate`)."""
