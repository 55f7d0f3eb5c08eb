"""The offline demo and the evaluations built on it, in one package: the demo's data and recipe
(data.py, offline.py: what `make run` trains when no model files are present), the mask-adapter
evaluation (mask_eval.py), the near-duplicate edits the dataset-prep tests and thumbnails use
(near_dups.py) and the template thumbnails (thumbnails.py). Front ends: scripts/oboro-demo,
scripts/oboro-mask-eval, scripts/oboro-thumbnails; the ablations and recipe sweeps in bench/."""
