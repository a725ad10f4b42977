"""Grid files of the dev-split search and the ablation bench: parsing, checking, trial keys.

The file format is described in ``innerpissa.tune``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

from ..errors import ConfigError

TUNE_DEFAULTS: dict[str, Any] = {
    "model": None,
    "concept": "honesty",
    "seed": 0,
    "rungs": [0.5, 2.0],
    "keep": 0.34,
    "kl_budget": 0.05,
    "n_target": 64,
    "n_other": 16,
    "coeffs": [-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0],
    "baselines": ["prompting", "pca", "mean-diff"],
    "batch_size": 32,
    "split": "dev",
    "train_seeds": None,
}


#: adapter families a trial can train: InnerPiSSA, LoRA (``adapter/lora.py``) and the PEFT families of
#: ``adapter/families.py`` (evaluated with the torch engine: the Rust engine runs InnerPiSSA-format adapters only)
PEFT_ONLY = ("dora", "delora", "oft", "boft", "psoft", "road", "ia3")


FAMILY_CHOICES = ("innerpissa", "lora", *PEFT_ONLY)


@dataclasses.dataclass
class Grid:
    """A parsed grid file: search settings, settings shared by every trial, and the axes of the grid."""

    tune: dict[str, Any]
    fixed: dict[str, Any]
    axes: dict[str, list]
    source: str = ""

    def trials(self) -> list[dict[str, Any]]:
        """Every combination of the axes, each merged over ``fixed`` (axis values win). A joint axis
        (``"a,b" = [[a1, b1], [a2, b2]]``) sets its keys together."""
        out = []
        for combo in itertools.product(*self.axes.values()):
            params = dict(self.fixed)
            for name, value in zip(self.axes, combo):
                keys = name.split(",")
                params.update(zip(keys, value) if len(keys) > 1 else [(name, value)])
            out.append(params)
        return out

    def columns(self) -> list[str]:
        """The settings the axes vary, one per key (a joint axis gives several)."""
        return [k for name in self.axes for k in name.split(",")]


def split_params(params: dict[str, Any], source: str) -> tuple[dict, dict]:
    from ..adapter.config import AdapterConfig
    from ..train import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    adapter_fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    tr, ad = {}, {}
    for key, value in params.items():
        if key == "family":
            if value not in FAMILY_CHOICES:
                raise ConfigError(
                    f"family must be one of {', '.join(FAMILY_CHOICES)}, got {value!r}", path=source, field=key
                )
            continue
        group, _, name = key.partition(".")
        if group == "train" and name in train_fields and name not in ("seed", "epochs", "steps"):
            tr[name] = value
        elif group == "adapter" and name in adapter_fields and name != "seed":
            ad[name] = None if name == "depth_range" and value is None else value
        else:
            raise ConfigError(
                f"unknown setting {key!r}; use train.<field> ({', '.join(sorted(train_fields))}) or "
                f"adapter.<field> ({', '.join(sorted(adapter_fields))}); seed and epochs come from "
                "[tune]",
                path=source,
                field=key,
            )
    if "depth_range" in ad and isinstance(ad["depth_range"], list):  # TOML has no null: [start] = to L − 3
        dr = ad["depth_range"]
        ad["depth_range"] = (dr[0], dr[1] if len(dr) > 1 else None)
    for name in ("modules",):
        if isinstance(ad.get(name), list):
            ad[name] = tuple(ad[name])
    return tr, ad


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (every trial's configuration is validated before any compute).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: bad TOML, an unknown section or key, an empty axis, a bad value (names file and key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML ({e})", path=path) from None
    unknown = set(raw) - {"tune", "fixed", "grid"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; use [tune], [fixed], [grid]", path=path)
    tune = dict(TUNE_DEFAULTS)
    for k, v in raw.get("tune", {}).items():
        if k not in TUNE_DEFAULTS:
            raise ConfigError(f"unknown [tune] key {k!r}; known: {', '.join(TUNE_DEFAULTS)}", path=path, field=k)
        tune[k] = v
    rungs = tune["rungs"]
    if not isinstance(rungs, list) or not rungs or not all(isinstance(r, (int, float)) and r > 0 for r in rungs):
        raise ConfigError(f"[tune] rungs must be a list of epochs > 0, got {rungs!r}", path=path, field="rungs")
    if not (isinstance(tune["keep"], (int, float)) and 0 < tune["keep"] <= 1):
        raise ConfigError(f"[tune] keep must be in (0, 1], got {tune['keep']!r}", path=path, field="keep")
    if tune["split"] not in ("dev", "test"):
        raise ConfigError(f"[tune] split must be 'dev' or 'test', got {tune['split']!r}", path=path, field="split")
    seeds = tune["train_seeds"]
    if seeds is not None and not (
        isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
    ):
        raise ConfigError(
            f"[tune] train_seeds must be a non-empty list of integers, got {seeds!r}", path=path, field="train_seeds"
        )
    axes = {}
    for k, v in raw.get("grid", {}).items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"[grid] {k} must be a non-empty list of values, got {v!r}", path=path, field=k)
        n_keys = len(k.split(","))
        if n_keys > 1 and not all(isinstance(x, list) and len(x) == n_keys for x in v):
            raise ConfigError(
                f"[grid] joint axis {k} needs a list of {n_keys}-element lists (one value per key), got {v!r}",
                path=path,
                field=k,
            )
        axes[k] = v
    grid = Grid(tune, dict(raw.get("fixed", {})), axes, str(path))
    from ..adapter.config import AdapterConfig
    from ..concepts import get_concept
    from ..train import TrainConfig

    get_concept(tune["concept"])
    for trial in grid.trials():
        tr, ad = split_params(trial, str(path))
        try:
            tcfg = TrainConfig(**tr)
            AdapterConfig(**ad)
        except TypeError as e:
            raise ConfigError(f"bad setting in trial {trial}: {e}", path=path) from None
        family = trial.get("family", "innerpissa")
        if family != "innerpissa" and tcfg.basis != "pca":
            raise ConfigError(
                f'trial {trial}: family {family} needs train.basis = "pca" (there are no singular '
                "vectors to read the loss in)",
                path=path,
                field="train.basis",
            )
    return grid


#: [tune] settings that change a score: part of every row's key, so a rerun with other values recomputes.
SCORING_KEYS = ("model", "concept", "seed", "kl_budget", "coeffs", "n_target", "n_other")


def trial_key(params: dict[str, Any], tune: dict[str, Any], train_seed: int | None = None) -> str:
    """12 hex digits identifying a trial: its settings, the [tune] settings that change its score, and the
    training seed when it differs from ``seed`` (so the keys of single-seed dev searches stay as they were); the
    test split adds itself."""
    ident = {"params": params, **{k: tune[k] for k in SCORING_KEYS}}
    if train_seed is not None and train_seed != tune["seed"]:
        ident["train_seed"] = train_seed
    if tune.get("split", "dev") != "dev":
        ident["split"] = tune["split"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def train_seeds(tune: dict[str, Any]) -> list[int]:
    """The training seeds of every trial: ``train_seeds``, or the one data ``seed``."""
    return list(tune["train_seeds"]) if tune.get("train_seeds") else [tune["seed"]]
