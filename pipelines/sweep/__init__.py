"""Sweeps: the folder's names (:mod:`.grid`), what a sweep is and what is left of it (:mod:`.plan`),
running it (:mod:`.run`), its summary (:mod:`.report`) and figures (:mod:`.figures`)."""
