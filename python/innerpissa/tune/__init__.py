"""Dev-split search over training recipes: a grid of training and adapter settings, screened by successive
halving, scored by the evaluator on **dev items only** (test items are never read).

Grid file (TOML)::

    [tune]
    model = "embedded:smollm2"
    concept = "sentiment"
    seed = 0
    rungs = [0.5, 2.0]      # epochs per rung; every trial of a rung trains from scratch with that budget
    keep = 0.34             # fraction of a rung's trials promoted to the next one (at least one)
    kl_budget = 0.05        # nats/token, as in the evaluator
    n_target = 64           # items drawn per target set (its dev half is scored)
    n_other = 16            # items drawn per off-target persona set (dev half; sets with no dev item are dropped)

With ``seed``, ``n_target`` and ``n_other`` equal to the evaluation's (``ipissa eval``/``scripts/results.py``:
64 and 16, seed 0) the dev items here are exactly the evaluation's dev items, so no reported test item is ever
seen by the search; other values draw other subsets, and the tables' test items may then overlap them.
    coeffs = [-2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2]
    baselines = ["prompting", "pca", "mean-diff"]   # scored once on the same dev items, for reference

    [fixed]                 # settings every trial shares
    "train.batch_pairs" = 8

    [grid]                  # every combination is a trial
    "train.objective" = ["reprpo-svd", "anchored"]
    "adapter.depth_range" = [[0.1, 0.5], [0.3]]     # [start] runs to the default end (L − 3)
    "train.loss_layer,train.lr" = [[0.5, 3e-3], [0.7, 1e-2]]   # a joint axis: these keys change together

Keys are ``train.<TrainConfig field>``, ``adapter.<AdapterConfig field>``, or ``family`` (``"innerpissa"``, the
default, or ``"lora"``: PEFT LoRA with the same objective, ``adapter/lora.py``; it needs ``train.basis = "pca"``).

**Score** of a trial: the mean over the concept's target sets of (expected sign × balanced effect at the KL
budget), nats, on dev items. Each row also holds every target set's effect with its CI, the bias, ρ, both sides'
effects, the mean |bias| and |effect| over the off-target sets, whether the budget was reached, the KL-matched
coefficient and train/eval minutes.

Outputs in ``out``: ``rows.jsonl`` (one row per trial × rung and per baseline, appended as each finishes, so an
interrupted search loses at most the trial in progress; a rerun skips finished rows and resumes an unfinished
training run), ``runs/<key>/epochs<e>/`` (training run directories) and ``summary.md`` (tables, best first).
One process at a time: run nothing else CPU-heavy beside it.
"""

from .grid import FAMILY_CHOICES, PEFT_ONLY, SCORING_KEYS, TUNE_DEFAULTS, Grid, load_grid, train_seeds, trial_key
from .search import run_search, score_row
from .tables import seed_summary, seed_table, write_summary

__all__ = [
    "FAMILY_CHOICES",
    "PEFT_ONLY",
    "SCORING_KEYS",
    "TUNE_DEFAULTS",
    "Grid",
    "load_grid",
    "run_search",
    "score_row",
    "seed_summary",
    "seed_table",
    "train_seeds",
    "trial_key",
    "write_summary",
]
