"""The Metis-RISE stages around training: triage, expert augmentation, evaluation, pipeline."""
