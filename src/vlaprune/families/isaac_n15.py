"""GR00T N1.5 model code: NVIDIA Isaac-GR00T's N1.5, as LeRobot ported it, run next to LeRobot 0.6.1.

LeRobot dropped N1.5 in 0.6.0; its faithful port of Isaac-GR00T's ``GR00T_N1_5`` last shipped in
``lerobot==0.5.1`` (``lerobot/policies/groot/``: ``groot_n1.py``, ``action_head/``, the Eagle 2.5
VL backbone in ``eagle2_hg_model/``). vlaprune runs THAT code, unmodified: the files are extracted
from the release's wheel (``pip download lerobot==0.5.1 --no-deps``; ``make`` fetches it into
``.venv/vlaprune-n15/``) into the cache and imported as the package ``lerobot_groot_n15``, next to
the installed 0.6.1 (whose ``lerobot.policies.groot`` is N1.7). Nothing of it is copied into vlaprune.

Running 0.5.1's code under LeRobot 0.6.1 / transformers 5.5 (it pinned transformers 5.3) needs these
runtime shims, all applied here and only to the alias package:

* its absolute imports of ``lerobot.policies.groot.*`` are redirected to the alias package while it
  imports (LeRobot 0.6.1's own ``lerobot.policies.groot`` modules are restored afterwards);
* transformers 5.5 already makes every config class a dataclass; the wheel's second ``@dataclass``
  on ``GR00TN15Config`` is skipped;
* the vendored Eagle code asks for flash-attention 2; without ``flash_attn`` installed, SDPA is used;
* the action head builds its ``Beta`` distribution on the CPU (transformers builds models on the meta
  device); ``GR00TN15.__init__`` is followed by ``post_init``'s bookkeeping (tied weights) without
  re-initialising weights, and ``from_pretrained`` treats it as remote code so loaded modules are not
  re-initialised (Eagle's ``_init_weights`` writes in place).

``GR00TN15.from_pretrained`` (LeRobot's port of the Isaac-GR00T loader) is lenient: missing tensors
are re-initialised, unexpected ones dropped, with a printed report. :func:`load_checkpoint` wraps it
and refuses any checkpoint whose tensors do not cover the model exactly.

The vision encoder's depth is not in the checkpoint's ``config.json``: the Eagle backbone builds its
SigLIP tower from the Eagle 2.5 VL config directory that ``backbone_cfg.tokenizer_assets_repo`` names
under ``HF_LEROBOT_HOME`` (an absolute path is taken as is). A checkpoint with a pruned vision encoder
therefore carries its own copy of that directory as ``eagle/`` (with ``vision_config.num_hidden_layers``
set to the kept count, and the marker ``vlaprune_eagle.json``). Its ``config.json`` names the
content-addressed copy in vlaprune's cache where the checkpoint was written (so Isaac-GR00T's own loader
reads it there), and :func:`load_checkpoint` rebuilds that copy from ``eagle/`` wherever the checkpoint
is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

RELEASE = "0.5.1"  # the last LeRobot release with GR00T N1.5
WHEEL = f"lerobot-{RELEASE}-py3-none-any.whl"
ALIAS = "lerobot_groot_n15"
_SOURCE = "lerobot.policies.groot"
_IN_WHEEL = "lerobot/policies/groot/"


def wheel_path() -> Path:
    """The lerobot 0.5.1 wheel: ``$VLAPRUNE_N15_WHEEL``, else ``<venv>/vlaprune-n15/`` (where ``make`` puts it)."""
    env = os.environ.get("VLAPRUNE_N15_WHEEL")
    path = Path(env) if env else Path(sys.prefix) / "vlaprune-n15" / WHEEL
    if not path.is_file():
        raise FileNotFoundError(
            f"GR00T N1.5 needs LeRobot {RELEASE}'s model code, and {path} does not exist. Fetch the wheel (about "
            f"2 MB, from the package index): python -m pip download lerobot=={RELEASE} --no-deps -d {path.parent} "
            "(make does this), or point VLAPRUNE_N15_WHEEL at it"
        )
    return path


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith(_IN_WHEEL) and not n.endswith("/")]
        if not any(n.endswith("groot_n1.py") for n in names):
            raise ValueError(f"{wheel} has no {_IN_WHEEL}groot_n1.py: not a LeRobot release with GR00T N1.5")
        for name in names:
            out = dest / ALIAS / name[len(_IN_WHEEL):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(archive.read(name))


def package_root() -> Path:
    """The cache directory holding the extracted ``lerobot_groot_n15`` package (extracted on first use)."""
    from vlaprune.io.cache import generated_dir

    wheel = wheel_path()
    stat = wheel.stat()
    return generated_dir("lerobot-groot-n15", {"wheel": wheel.name, "size": stat.st_size},
                         marker=f"{ALIAS}/groot_n1.py", write=lambda tmp: _extract(wheel, tmp))


class _Redirect(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """While the alias package imports, ``lerobot.policies.groot[.x]`` means ``lerobot_groot_n15[.x]``."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == _SOURCE or fullname.startswith(_SOURCE + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(ALIAS + spec.name[len(_SOURCE):])
        self._spec = getattr(module, "__spec__", None)
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self._spec  # importlib overwrote it with the redirect's spec


def _package(name: str, path: Path) -> None:
    """A package module with ``__path__`` whose ``__init__`` is not run (it imports LeRobot 0.5.1's policy API)."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path / "__init__.py")
    sys.modules[name] = module


def _sdpa_without_flash_attn() -> None:
    from transformers import modeling_utils
    from transformers.utils import is_flash_attn_2_available

    cls = modeling_utils.PreTrainedModel
    original = cls._check_and_adjust_attn_implementation
    if getattr(original, "_vlaprune", False):
        return

    def check(self: Any, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            attn_implementation = "sdpa"
        return original(self, attn_implementation, *args, **kwargs)

    check._vlaprune = True  # type: ignore[attr-defined]
    cls._check_and_adjust_attn_implementation = check  # type: ignore[method-assign]


def _single_dataclass(real: Any) -> Any:
    def dataclass(cls: Any = None, /, **kwargs: Any) -> Any:
        def wrap(c: Any) -> Any:
            if c.__module__.startswith(ALIAS) and "__dataclass_fields__" in c.__dict__:
                return c
            return real(c, **kwargs)

        return wrap if cls is None else wrap(cls)

    return dataclass


def load() -> types.ModuleType:
    """LeRobot 0.5.1's ``groot_n1`` module (``GR00TN15``, ``GR00TN15Config``), imported once per process."""
    if f"{ALIAS}.groot_n1" in sys.modules:
        return sys.modules[f"{ALIAS}.groot_n1"]
    root = package_root()
    _sdpa_without_flash_attn()
    # LeRobot 0.6.1's parents first: lerobot/policies/__init__ imports .groot.configuration_groot, which
    # inside the redirect would register 0.5.1's GrootConfig as the "groot" type
    for name in ("lerobot.policies", "lerobot.utils.constants", "lerobot.utils.import_utils"):
        importlib.import_module(name)
    _package(ALIAS, root / ALIAS)
    _package(f"{ALIAS}.action_head", root / ALIAS / "action_head")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == _SOURCE or k.startswith(_SOURCE + ".")}
    finder = _Redirect()
    sys.meta_path.insert(0, finder)
    real_dataclass = dataclasses.dataclass
    dataclasses.dataclass = _single_dataclass(real_dataclass)
    try:
        module = importlib.import_module(f"{ALIAS}.groot_n1")
    finally:
        dataclasses.dataclass = real_dataclass
        sys.meta_path.remove(finder)
        for key in [k for k in sys.modules if k == _SOURCE or k.startswith(_SOURCE + ".")]:
            del sys.modules[key]
        sys.modules.update(saved)
        policies = sys.modules["lerobot.policies"]
        if _SOURCE in saved:
            policies.groot = saved[_SOURCE]  # type: ignore[attr-defined]
        elif getattr(policies, "groot", None) is sys.modules.get(ALIAS):
            delattr(policies, "groot")
    head: Any = sys.modules[f"{ALIAS}.action_head.flow_matching_action_head"]
    beta = head.Beta

    def beta_on_cpu(*args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"):
            return beta(*args, **kwargs)

    head.Beta = beta_on_cpu
    model_cls = module.GR00TN15
    init = model_cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.__dict__["init_weights"] = lambda *_a, **_k: None  # post_init's bookkeeping, not its init
        try:
            self.post_init()
        finally:
            del self.__dict__["init_weights"]
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    model_cls.__init__ = __init__
    model_cls.is_remote_code = classmethod(lambda cls: True)
    return module


EAGLE_DIR = "eagle"  # a checkpoint's own Eagle config directory, where its vision encoder is pruned
_EAGLE_MARKER = "vlaprune_eagle.json"


def eagle_dir(config: Any) -> Path:
    """The Eagle 2.5 VL config directory a ``GR00TN15Config``'s backbone builds from (as ``EagleBackbone`` finds it)."""
    from lerobot.utils.constants import HF_LEROBOT_HOME

    return Path(HF_LEROBOT_HOME) / config.backbone_cfg["tokenizer_assets_repo"]


def carries_eagle(config: Any) -> bool:
    """Whether a model built from ``config`` reads a vlaprune-made Eagle directory (its vision encoder pruned),
    which its checkpoint must carry."""
    return (eagle_dir(config) / _EAGLE_MARKER).is_file()


def eagle_copy(files: Path, eagle: dict[str, Any]) -> Path:
    """A content-addressed directory in vlaprune's cache holding the files of the Eagle directory ``files``
    with ``config.json`` replaced by ``eagle`` (the Eagle 2.5 VL config) and the vlaprune marker."""
    from vlaprune.io.cache import generated_dir

    if not (files / "config.json").is_file():
        raise FileNotFoundError(f"{files} is not an Eagle config directory (no config.json)")
    names = sorted(p.name for p in files.iterdir() if p.is_file() and p.name not in ("config.json", _EAGLE_MARKER))

    def write(tmp: Path) -> None:
        for name in names:
            shutil.copy2(files / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(eagle, indent=1))
        marker = {"vision_num_hidden_layers": eagle["vision_config"]["num_hidden_layers"]}
        (tmp / _EAGLE_MARKER).write_text(json.dumps(marker, indent=1))

    digests = {name: hashlib.sha256((files / name).read_bytes()).hexdigest() for name in names}
    return generated_dir("eagle-n15", {"eagle": eagle, "files": digests}, marker=_EAGLE_MARKER, write=write)


def vision_pruned_eagle(config: Any, vision_depth: int) -> Path:
    """The Eagle directory of ``config``'s backbone with its SigLIP tower at ``vision_depth`` layers."""
    source = eagle_dir(config)
    eagle = json.loads((source / "config.json").read_text())
    select = eagle.get("select_layer", -1)
    if select != -1:
        raise ValueError(
            f"this GR00T N1.5's Eagle backbone reads vision layer {select} (select_layer in {source / 'config.json'}), "
            "not the tower's output: vlaprune prunes its vision encoder only when select_layer is -1; leave "
            "'vision' out of --plan.stacks"
        )
    eagle["vision_config"] = {**eagle["vision_config"], "num_hidden_layers": vision_depth}
    return eagle_copy(source, eagle)


def is_n15_checkpoint(path: str | Path) -> bool:
    """A directory holding an Isaac-GR00T N1.5 checkpoint (``config.json`` with ``model_type`` gr00t_n1_5)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("model_type") == "gr00t_n1_5"


def load_checkpoint(path: str | Path) -> Any:
    """``GR00TN15.from_pretrained(path)``, refusing a checkpoint that does not cover the model exactly
    (that loader re-initialises missing tensors and drops unexpected ones)."""
    from lerobot_policy_vlaprune.checks import check_weights

    module = load()
    own = Path(path) / EAGLE_DIR
    if (own / _EAGLE_MARKER).is_file():  # its own Eagle config (a pruned vision encoder): read it from there
        config = module.GR00TN15Config.from_pretrained(str(path))
        eagle = json.loads((own / "config.json").read_text())
        config.backbone_cfg = {**config.backbone_cfg, "tokenizer_assets_repo": str(eagle_copy(own, eagle))}
        model = module.GR00TN15.from_pretrained(str(path), config=config)
    else:
        model = module.GR00TN15.from_pretrained(str(path))
    check_weights(model, Path(path) / "model.safetensors", "the GR00T N1.5 model its config.json builds")
    return model.eval()


class N15Policy(nn.Module):
    """What vlaprune needs of a policy, around a ``GR00TN15`` model (Isaac-GR00T layout, no LeRobot policy).

    An ``nn.Module`` holding the model as ``.model`` (so the family's module paths start at
    ``model.``), with ``forward(batch) -> (loss, info)``, ``select_action`` / ``predict_action_chunk``
    / ``reset`` as LeRobot policies have them. The batch holds the model's own inputs (``eagle_*``
    tensors, ``state`` (B, 1, max_state_dim), ``embodiment_id``, and ``action`` / ``action_mask`` for
    training). ``save_pretrained`` writes the model alone in the Isaac-GR00T layout (``config.json`` +
    ``model.safetensors``), which ``GR00TN15.from_pretrained`` reads, and the model's Eagle directory
    (``eagle/``) where its vision encoder is pruned.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self._queue: list[Any] = []

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        loss = self.model.forward(model_inputs(batch, with_action=True))["loss"]
        return loss, {"loss": float(loss.detach())}

    def predict_action_chunk(self, batch: dict[str, Any]) -> Any:
        with torch.no_grad():
            return self.model.get_action(model_inputs(batch, with_action=False))["action_pred"]

    def reset(self) -> None:
        self._queue = []

    def select_action(self, batch: dict[str, Any]) -> Any:
        if not self._queue:
            self._queue = list(self.predict_action_chunk(batch).transpose(0, 1))
        return self._queue.pop(0)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(str(directory))
        if carries_eagle(self.config):
            own = Path(directory) / EAGLE_DIR
            own.mkdir()
            source = eagle_dir(self.config)
            for name in sorted(p.name for p in source.iterdir() if p.is_file()):
                shutil.copy2(source / name, own / name)


_MODEL_KEYS = ("state", "embodiment_id", "action", "action_mask")


def model_inputs(batch: dict[str, Any], *, with_action: bool) -> dict[str, Any]:
    """The entries of ``batch`` that ``GR00TN15.forward`` / ``get_action`` take."""
    keep = [k for k in batch if k.startswith("eagle_") or k in _MODEL_KEYS]
    if not with_action:
        keep = [k for k in keep if k not in ("action", "action_mask")]
    return {k: batch[k] for k in keep}
