"""The names of every file the project writes, in one place (each file has one schema, documented here).

A training run's folder (``python -m core.train``, a sweep trial, ``core.final_train``'s ``final/``):

- ``config.json``  the resolved TrainConfig (core/config.py)
- ``splits.csv``   image_id,label,group,split of every image (core/data/splits.py)
- ``metrics.csv``  one row per epoch: the dict the training loop logs (core/training/loop.py)
- ``run.json``     the run's state: status running|complete, best epoch, best and last rows, data
- ``best.pt``      the model of the best epoch by ``select_metric`` (a model file, core/model/networks.py)
- ``last.pt``      the resume state (model, optimiser, scheduler, EMA, history)

An evaluation's folder (``core.final_train``, ``core.evaluate``):

- ``metrics.json`` the evaluation document (format ``lesion-sweep/evaluation``, core/evaluation/pipeline.py)
- ``model.pt``     the evaluated model, with its calibration and operating thresholds from val (final training only)
- ``report.md``    the page to read first (core/evaluation/report.py)
- ``report.html``  the same page as one file, its figures inside (core/evaluation/report.py)

A sweep's folder (sweep/outputs.py says what each holds) has its own ``report.html``: the sweep's page
(sweep/report.py), and the names below ``FINAL_DIR``.
"""

CONFIG = "config.json"
SPLITS = "splits.csv"
METRICS_CSV = "metrics.csv"
RUN_STATE = "run.json"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
EVALUATION = "metrics.json"
MODEL = "model.pt"
REPORT = "report.md"
REPORT_HTML = "report.html"
BEST_TRIAL = "best.json"
FINAL_DIR = "final"            # core.final_train's default output folder, beside best.json
# A sweep's folder (python -m sweep.run).
SWEEP_SETTINGS = "sweep.json"    # the sweep's settings, read back by --resume (sweep/settings.py)
SPACE_COPY = "space.yaml"        # the space it searched
TRIALS_CSV = "trials.csv"        # one row per trial (sweep/outputs.py)
SUMMARY = "summary.txt"          # the summary printed at the end
CONFIRM_PLAN = "confirm.json"    # the confirmation runs planned after the search (sweep/confirm.py)
OPTUNA_DB = "optuna.db"          # the Optuna study (sweep/searcher.py)
TRIALS_DIR = "trials"            # trials/<id>/: one training run per trial
TRIAL_RECORD = "trial.json"      # trials/<id>/trial.json: parameters, status, error (sweep/recorder.py)
TRIAL_NODE = "node.json"         # trials/<id>/node.json: where the trial ran (sweep/trainable.py)
