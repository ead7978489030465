"""A PEFT LoRA adapter (adapter_config.json and adapter_model.safetensors|.bin) read as a run: the base plus s·B·A,
one matrix at a time, under the base's own tensor names."""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rlsub_tui.checkpoints.names import canonical
from rlsub_tui.checkpoints.readers import PickledStateDict, Reader, SafetensorsFile, TensorInfo
from rlsub_tui.util.errors import CheckpointError

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's own module names
# peft 0.21's save_pretrained leaves the adapter's name out of the keys; some older saves keep it (lora_A.default.weight)
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
SAVED_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>[^.]+)$")
BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>[^.]+)$")  # save_embedding_layers' copy of W0

# Settings under which the update is not W0 + s·B·A of the base as stored.
VARIANTS = {
    "use_dora": "DoRA also rescales every column of W0 + s·B·A by a learned magnitude",
    "lora_bias": "its lora_B carries a bias",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "target_parameters": "LoRA on bare parameters (such as MoE expert stacks) is not read",
    "trainable_token_indices": "trainable tokens are stored as a separate delta of embedding rows",
    "layer_replication": "replicated layers have no tensor in the base",
    "alora_invocation_tokens": "an activated LoRA applies only after its invocation tokens",
}
OTHER_VARIANTS = ("use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config")
# init_lora_weights that rewrite the base's weights when the adapter is made (W0 minus the initial B·A)
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraSettings:
    """What adapter_config.json says about the update of each module."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """r and lora_alpha of one module (its name in the wrapped model), patterns matched as PEFT matches them."""
        return (_pattern_value(self.rank_pattern, module, self.r),
                _pattern_value(self.alpha_pattern, module, self.alpha))

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r


@dataclass(frozen=True)
class LoraTarget:
    """One base matrix the adapter updates: W0 + scale · B·A (transposed where PEFT's layer stores it so)."""

    module: str
    key_a: str
    key_b: str
    r: int
    alpha: float
    scale: float
    transpose: bool
    base_weight: str | None  # adapter key of a saved copy of W0 (save_embedding_layers), else the base's own


def _pattern_value(pattern: dict, module: str, default):
    for key, value in pattern.items():  # peft.utils.other.get_pattern_key: the first key that ends the name
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_settings(config: Path) -> LoraSettings:
    """Parse adapter_config.json; anything that is not a plain LoRA (or rsLoRA) update is refused in one sentence."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{config}: cannot be read ({exc.strerror or exc}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{config}: is not valid JSON.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config}: is not a JSON object of adapter settings.")
    kind = data.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{config}: is a PEFT {kind} adapter (peft_type); only LoRA adapters are read.")
    for field, why in list(VARIANTS.items()) + [(f, "a LoRA variant whose update is not s·B·A") for f in OTHER_VARIANTS]:
        if data.get(field):
            raise CheckpointError(f"{config}: sets {field} ({data[field]!r}): {why}; only plain LoRA and rsLoRA "
                                  "adapters are read.")
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{config}: init_lora_weights '{init}' changed the base's weights when the adapter was made, so it is "
            "not an update of the base as stored (save it with path_initial_model_for_weight_conversion to read it).")
    r, alpha = data.get("r"), data.get("lora_alpha", 8)  # 8: LoraConfig's default
    if type(r) is not int or r < 1:
        raise CheckpointError(f"{config}: 'r' must be a positive integer, not {r!r}.")
    if not _number(alpha):
        raise CheckpointError(f"{config}: 'lora_alpha' must be a number, not {alpha!r}.")
    patterns = []
    for field, valid in (("rank_pattern", lambda v: type(v) is int and v >= 1), ("alpha_pattern", _number)):
        pattern = data.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and valid(v) for k, v in pattern.items()):
            raise CheckpointError(f"{config}: '{field}' must map module names to {'ranks' if field[0] == 'r' else 'alphas'}.")
        for key in pattern:
            try:
                re.compile(key)
            except re.error:
                raise CheckpointError(f"{config}: {field} key '{key}' is not a valid pattern.") from None
        patterns.append(pattern)
    return LoraSettings(r, float(alpha), bool(data.get("use_rslora")), bool(data.get("fan_in_fan_out")), *patterns)


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


class PeftAdapter(Reader):
    """A LoRA run: every base tensor under the base's name; LoRA targets are W0 + s·B·A in float32 (W0 cast up
    exactly, so the true update is kept), tensors saved in full (modules_to_save) are as stored, the rest is the
    base's own. One matrix is computed at a time, when read."""

    def __init__(self, files: list[Path], base):
        weights, config = files[0], files[1]
        if base is None:
            raise CheckpointError(f"{weights.parent}: is a PEFT adapter; it can only be read as a run, against a base.")
        self.base, self.file = base, weights
        self.settings = read_settings(config)
        self._adapter: Reader = SafetensorsFile(weights) if weights.suffix == ".safetensors" else PickledStateDict([weights])
        self._by_canonical: dict[str, str] = {}
        for name in base.tensors:
            self._by_canonical.setdefault(canonical(name), name)
        self.targets: dict[str, LoraTarget] = {}  # base name -> its LoRA
        self.saved: dict[str, str] = {}  # base name (or the adapter's, for a tensor the base lacks) -> adapter key
        self._parse_keys()
        self.tensors = self._directory()
        self._lock = threading.Lock()
        self._held: tuple[str, torch.Tensor] | None = None  # the last target read_bytes computed, as bytes

    def _parse_keys(self) -> None:
        """Sort the adapter's keys into LoRA pairs, copies of W0 and tensors saved in full; refuse unknown LoRA parts."""
        pairs: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key}
        embeddings: set[str] = set()
        base_layers: dict[str, str] = {}
        for key in self._adapter.tensors:
            inner = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if m := LORA_KEY.match(inner) or EMBEDDING_KEY.match(inner):
                pair, side = pairs.setdefault(m["module"], {}), m["part"][-1]
                if side in pair:
                    raise CheckpointError(f"{self.file}: holds two adapters for module '{m['module']}' "
                                          f"('{pair[side]}' and '{key}'); name an adapter folder holding one.")
                pair[side] = key
                if "embedding" in m["part"]:
                    embeddings.add(m["module"])
            elif m := BASE_LAYER_KEY.match(inner):
                base_layers[f"{m['module']}.{m['param']}"] = key
            elif m := SAVED_KEY.match(inner):
                self._save_in_full(f"{m['module']}.{m['param']}", key)
            elif any(p.startswith("lora_") for p in inner.split(".")):
                raise CheckpointError(f"{self.file}: holds '{key}', a LoRA part this reader does not know "
                                      "(only lora_A, lora_B, lora_embedding_A and lora_embedding_B are read).")
            else:
                self._save_in_full(inner, key)
        for module, pair in pairs.items():
            self._add_target(module, pair, module in embeddings, base_layers.pop(f"{module}.weight", None))
        for inner, key in base_layers.items():  # a base_layer copy with no LoRA beside it stands in full
            self._save_in_full(inner, key)
        if not self.targets and not self.saved:
            raise CheckpointError(f"{self.file}: holds no LoRA matrices (lora_A, lora_B) and no tensor saved in full.")

    def _base_name(self, inner: str) -> str | None:
        return self._by_canonical.get(canonical(inner))

    def _save_in_full(self, inner: str, key: str) -> None:
        name = self._base_name(inner) or inner  # a tensor the base lacks keeps its own name: the plan reports it
        if name in self.saved:
            raise CheckpointError(f"{self.file}: '{self.saved[name]}' and '{key}' are both saved for '{name}'.")
        self.saved[name] = key

    def _add_target(self, module: str, pair: dict[str, str], embedding: bool, base_weight: str | None) -> None:
        """One LoRA module as the update of its base weight (`base_weight`: the adapter's own copy of W0, if any)."""
        if "A" not in pair or "B" not in pair:
            have, lack = ("A", "B") if "A" in pair else ("B", "A")
            raise CheckpointError(f"{self.file}: module '{module}' has lora_{have} but no lora_{lack}.")
        name = self._base_name(f"{module}.weight")
        if name is None:
            raise CheckpointError(f"{self.file}: LoRA module '{module}' has no weight in the base {self.base.source} "
                                  f"(no tensor '{module}.weight'): the adapter was made on another model.")
        if name in self.targets:
            raise CheckpointError(f"{self.file}: modules '{self.targets[name].module}' and '{module}' both "
                                  f"update '{name}'.")
        a, b = self._adapter.tensors[pair["A"]], self._adapter.tensors[pair["B"]]
        w0 = self._adapter.tensors[base_weight] if base_weight else self.base.tensors[name]
        if w0.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise CheckpointError(f"{self.file}: LoRA module '{module}' updates '{name}', stored in the base as "
                                  f"{w0.dtype}; only a LoRA on a float16, bfloat16 or float32 weight is read.")
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise CheckpointError(f"{self.file}: LoRA module '{module}' holds non-float lora matrices.")
        # PEFT's Embedding stores ΔW as (B·A)ᵀ; for other layers PEFT sets fan_in_fan_out per layer type
        # (true for GPT-2's Conv1D, false for nn.Linear), so the config's flag can be a neighbour's
        transpose = _orientation(a.shape, b.shape, w0.shape, [True] if embedding else
                                 [self.settings.fan_in_fan_out, not self.settings.fan_in_fan_out])
        if transpose is None:
            raise CheckpointError(f"{self.file}: LoRA module '{module}' does not fit the base: lora_B "
                                  f"{list(b.shape)} · lora_A {list(a.shape)} cannot update '{name}' of shape "
                                  f"{list(w0.shape)}.")
        r, alpha = self.settings.rank_alpha(module)
        if a.shape[0] != r:
            raise CheckpointError(f"{self.file}: LoRA module '{module}' has rank {a.shape[0]} but its "
                                  f"adapter_config.json gives it r={r}.")
        self.targets[name] = LoraTarget(module, pair["A"], pair["B"], r, alpha, self.settings.scale(r, alpha),
                                        transpose, base_weight)

    def _directory(self) -> dict[str, TensorInfo]:
        both = set(self.targets) & set(self.saved)
        if both:
            name = sorted(both)[0]
            raise CheckpointError(f"{self.file}: '{name}' is both a LoRA target and saved in full "
                                  f"('{self.saved[name]}').")
        tensors = dict(self.base.tensors)
        for name, t in self.targets.items():
            w0 = self._adapter.tensors[t.base_weight] if t.base_weight else self.base.tensors[name]
            dtype = _compute_dtype(w0.dtype)
            a = self._adapter.tensors[t.key_a]
            tensors[name] = TensorInfo(name, dtype, w0.shape, self.file, a.offset, w0.numel * dtype.itemsize)
        for name, key in self.saved.items():
            info = self._adapter.tensors[key]
            tensors[name] = TensorInfo(name, info.dtype, info.shape, info.file, info.offset, info.nbytes)
        return tensors

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        if name in self.targets:
            return self._updated(name, rows)
        if name in self.saved:
            return self._adapter.read(self.saved[name], rows)
        return self.base.read(name, rows)

    def _updated(self, name: str, rows: int | None) -> torch.Tensor:
        """W0 + s·B·A of one target in float32 (float64 for a float64 base), in the order PEFT merges it."""
        t = self.targets[name]
        dtype = self.tensors[name].dtype
        delta = self._adapter.read(t.key_b).to(dtype) @ self._adapter.read(t.key_a).to(dtype)
        delta = delta.T if t.transpose else delta
        delta = delta[:rows] if rows is not None else delta
        w0 = self._adapter.read(t.base_weight, rows) if t.base_weight else self.base.read(name, rows)
        updated = w0.to(dtype, copy=True)  # never the reader's own memory, whatever the base's reader
        del w0
        return updated.add_(delta.mul_(t.scale))  # in place, the same roundings as W0 + (B@A)·s

    def read_bytes(self, name: str, out: torch.Tensor, start: int) -> None:
        if name in self.saved:
            self._adapter.read_bytes(self.saved[name], out, start)
        elif name not in self.targets:
            self.base.read_bytes(name, out, start)
        else:
            with self._lock:  # a staged read asks for one tensor in slices: compute it once, hold it until done
                if self._held is None or self._held[0] != name:
                    self._held = None
                    self._held = (name, self._updated(name, None).reshape(-1).view(torch.uint8))
                flat = self._held[1]
                out.copy_(flat[start:start + out.numel()])
                if start + out.numel() >= flat.numel():
                    self._held = None

    def unchanged(self, name: str) -> bool:
        """Whether the run's tensor `name` is the base's own (neither a LoRA target nor saved in full)."""
        return name not in self.targets and name not in self.saved

    def notes(self, label: str) -> list[str]:
        targets = list(self.targets.values())
        ranks, alphas, scales = ({getattr(t, f) for t in targets} for f in ("r", "alpha", "scale"))
        precision = "float64" if any(self.tensors[n].dtype == torch.float64 for n in self.targets) else "float32"
        saved = f", {len(self.saved)} tensor{'s' if len(self.saved) != 1 else ''} saved in full" if self.saved else ""
        if not targets:
            return [f"run '{label}' is a PEFT adapter with no LoRA matrices{saved}: read against the base "
                    f"'{self.base.label}'."]
        return [f"run '{label}' is a LoRA adapter (r={_span(ranks)}, alpha {_span(alphas)}"
                f"{', rsLoRA' if self.settings.rslora else ''}, {len(targets)} target matri"
                f"{'ces' if len(targets) != 1 else 'x'}{saved}): its update is s·B·A (s = {_span(scales)}), "
                f"of rank at most {max(ranks)}, read against the base '{self.base.label}' in {precision}."]

    def close(self) -> None:
        self._held = None
        self._adapter.close()


def _orientation(a: tuple[int, ...], b: tuple[int, ...], w0: tuple[int, ...], tries: list[bool]) -> bool | None:
    """Whether B·A must be transposed to update a weight of shape `w0` (the first of `tries` that fits); None if
    neither fits."""
    if not (len(a) == len(b) == len(w0) == 2 and a[0] == b[1]):
        return None
    return next((t for t in tries if ((a[1], b[0]) if t else (b[0], a[1])) == tuple(w0)), None)


def _compute_dtype(w0: torch.dtype) -> torch.dtype:
    return torch.float64 if w0 == torch.float64 else torch.float32


def _span(values: set) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
