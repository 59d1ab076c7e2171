"""Evaluation of a policy: Pass@k over runs and the report (:mod:`.evaluate`), the reflection
detector and DSR / ERR (:mod:`.reflection`), and training-dynamics plots of run directories
(:mod:`.plot`)."""
