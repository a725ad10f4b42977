"""Held-out evaluation sets (docs/design.md §5): model-written evals, DailyDilemmas, TruthfulQA, neutral texts.

Every set becomes an :class:`EvalDataset` of :class:`EvalItem` s holding the *untemplated* user question and a
label ``y`` in {+1, -1, 0}: +1 when answering "Yes" (or "(A)") is the dataset's target behaviour, -1 when "No"
(or "(B)") is, 0 when unlabelled. The evaluator adds the chat template and the answer instruction, reads the
Yes/No score and forms the label-aligned score ``y * score``. Multiple-choice items (TruthfulQA, kind ``"mc"``)
also carry their true and false answers; their score is the length-normalised log-likelihood gap (see
``engines.mc_score``) and their label is +1 (a true answer is the target behaviour).

Sources (CC BY 4.0):

* Anthropic model-written evals (Perez et al. 2022), https://github.com/anthropics/evals — ``persona/*.jsonl``
  (Yes/No) and ``advanced-ai-risk/**.jsonl`` (A/B).
* DailyDilemmas (Chiu, Jiang, Choi 2024), https://github.com/kellycyy/daily_dilemmas — ``data/dilemma.csv``,
  ``data/values.csv``; the per-action value labels are in the Hugging Face release ``kellycyy/daily_dilemmas``
  (``dilemma_to_action_to_values_aggregated.csv``).
* TruthfulQA (Lin, Hilton, Evans 2022; Apache-2.0), https://github.com/sylinrl/TruthfulQA — ``TruthfulQA.csv``
  (or the Hugging Face ``truthful_qa`` "generation" rows as CSV/JSONL); read only from a path the user gives.

Imports only the standard library.

Modules: ``items`` (types, splits, neutral texts), ``mwe``, ``dailydilemmas``, ``truthfulqa`` (the loaders) and
``location`` (finding and fetching the files).
"""

from .dailydilemmas import FRAMEWORKS, load_dailydilemmas
from .items import NEUTRAL_TEXTS, EvalDataError, EvalDataset, EvalItem, dataset_seed, split_dev_test, subsample
from .location import (
    DATA_DIR_ENV,
    DataDownloadError,
    data_dir,
    dataset_url,
    default_cache_dir,
    default_files,
    fetch_dataset,
    fetch_default_data,
)
from .mwe import load_mwe
from .truthfulqa import load_truthfulqa

__all__ = [
    "DATA_DIR_ENV",
    "FRAMEWORKS",
    "NEUTRAL_TEXTS",
    "DataDownloadError",
    "EvalDataError",
    "EvalDataset",
    "EvalItem",
    "data_dir",
    "dataset_seed",
    "dataset_url",
    "default_cache_dir",
    "default_files",
    "fetch_dataset",
    "fetch_default_data",
    "load_dailydilemmas",
    "load_mwe",
    "load_truthfulqa",
    "split_dev_test",
    "subsample",
]
