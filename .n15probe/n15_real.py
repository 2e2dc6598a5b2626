"""Run the REAL GR00T N1.5 model code (lerobot==0.5.1 wheel, `lerobot/policies/groot/`) inside an env that has
lerobot 0.6.1 (whose `lerobot.policies.groot` is N1.7), without editing any wheel file.

Recipe
------
1. `extract_groot_n15(wheel, dest_root)` copies `lerobot/policies/groot/**` from the 0.5.1 wheel, unmodified, to
   `<dest_root>/lerobot_groot_n15/`.
2. `load_n15_package(dest_root)` imports it under the alias package name `lerobot_groot_n15`:
   * the package `__init__.py` files are NOT executed (they pull in GrootPolicy / processor / lerobot 0.5 config
     API); package module objects are created by hand with the right `__path__`;
   * while loading, a meta-path finder redirects the wheel's absolute imports `lerobot.policies.groot[.x]` to the
     SAME module objects `lerobot_groot_n15[.x]` (no duplicate modules); afterwards the finder is removed and
     any previously imported 0.6.1 `lerobot.policies.groot*` entries in sys.modules are restored untouched;
   * `groot_n1.tree` (dm-tree, optional import, absent in the venv) is set to a tiny `map_structure` shim;
   * `PreTrainedModel._check_and_adjust_attn_implementation` is wrapped so that "flash_attention_2" becomes "sdpa"
     when flash_attn is not installed (vendored Eagle hard-sets FA2 for the SigLIP tower).
3. `build_tiny_n15(seed)` writes a tiny Eagle config.json (Qwen3 text 4 layers -> truncated to select_layer=2,
   SigLIP 1 layer) into a scratch dir used as `tokenizer_assets_repo` (absolute path) and builds `GR00TN15`.

Env: set HF_HOME (trust_remote_code copies the Eagle module to $HF_HOME/modules) BEFORE transformers is imported;
this file sets defaults under /tmp/n15probe if unset. HF_HUB_OFFLINE=1 is set by default too; the tiny Eagle dir is
pre-filled with placeholder tokenizer/processor asset files so `ensure_eagle_cache_ready` never hits the network.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import os
import sys
import types
import zipfile
from pathlib import Path

SCRATCH = Path(os.environ.get("N15_SCRATCH", "/tmp/n15probe"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(SCRATCH / "hf_home"))

import torch  # noqa: E402

ALIAS = "lerobot_groot_n15"
SRC = "lerobot.policies.groot"
WHEEL_PREFIX = "lerobot/policies/groot/"
DEFAULT_WHEEL = SCRATCH / "dl" / "lerobot-0.5.1-py3-none-any.whl"  # pip download lerobot==0.5.1 --no-deps -d DIR
DEFAULT_PKG_ROOT = SCRATCH / "pkg"


# ----------------------------------------------------------------------------------------------------------------
def extract_groot_n15(wheel: str | Path = DEFAULT_WHEEL, dest_root: str | Path = DEFAULT_PKG_ROOT) -> Path:
    dest = Path(dest_root) / ALIAS
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.startswith(WHEEL_PREFIX) and not n.endswith("/"):
                out = dest / n[len(WHEEL_PREFIX):]
                out.parent.mkdir(parents=True, exist_ok=True)
                data = z.read(n)
                if not out.exists() or out.read_bytes() != data:
                    out.write_bytes(data)
    return dest


class _Redirect(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Maps `lerobot.policies.groot[.x]` -> the already/now imported module `lerobot_groot_n15[.x]`."""

    def find_spec(self, fullname, path, target=None):
        if fullname == SRC or fullname.startswith(SRC + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        mod = importlib.import_module(ALIAS + spec.name[len(SRC):])
        self._saved_spec = getattr(mod, "__spec__", None)
        return mod

    def exec_module(self, module):
        module.__spec__ = self._saved_spec  # undo the spec overwrite done by importlib's _init_module_attrs


def _make_pkg(name: str, path: Path) -> types.ModuleType:
    """Package module object with __path__ but WITHOUT executing its __init__.py."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(path / "__init__.py")
    sys.modules[name] = mod
    return mod


class _TreeShim:
    """Replacement for dm-tree's `tree.map_structure` (only use in groot_n1.py: dict/BatchFeature of tensors)."""

    @staticmethod
    def map_structure(fn, s):
        from collections.abc import Mapping

        if isinstance(s, Mapping):
            return type(s)({k: _TreeShim.map_structure(fn, v) for k, v in s.items()})
        if isinstance(s, (list, tuple)):
            return type(s)(_TreeShim.map_structure(fn, v) for v in s)
        return fn(s)


def _patch_fa2_to_sdpa():
    from transformers import modeling_utils
    from transformers.utils import is_flash_attn_2_available

    P = modeling_utils.PreTrainedModel
    if getattr(P._check_and_adjust_attn_implementation, "_n15_patched", False):
        return
    orig = P._check_and_adjust_attn_implementation

    def patched(self, attn_implementation, *args, **kwargs):
        if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            attn_implementation = "sdpa"
        return orig(self, attn_implementation, *args, **kwargs)

    patched._n15_patched = True
    P._check_and_adjust_attn_implementation = patched


def _no_double_dataclass(real_dataclass):
    """transformers>=5.4 turns every PreTrainedConfig subclass into a kw_only dataclass in __init_subclass__; the
    wheel's `@dataclass` on GR00TN15Config then re-processes the class non-kw_only and fails with
    "non-default argument 'backbone_cfg' follows default argument" (fields declared field(init=False) w/o default).
    Skip the second pass for alias-package config classes that are already dataclasses (own __dict__)."""

    def dataclass(cls=None, /, **kw):
        def wrap(c):
            if c.__module__.startswith(ALIAS) and "__dataclass_fields__" in c.__dict__:
                return c
            return real_dataclass(c, **kw)

        return wrap if cls is None else wrap(cls)

    return dataclass


def load_n15_package(pkg_root: str | Path = DEFAULT_PKG_ROOT, wheel: str | Path | None = None) -> types.ModuleType:
    """Import the wheel's groot_n1.py as `lerobot_groot_n15.groot_n1` and return that module."""
    if f"{ALIAS}.groot_n1" in sys.modules:
        return sys.modules[f"{ALIAS}.groot_n1"]
    pkg_root = Path(pkg_root)
    if not (pkg_root / ALIAS / "groot_n1.py").exists():
        extract_groot_n15(wheel or DEFAULT_WHEEL, pkg_root)
    _patch_fa2_to_sdpa()
    # Import the env's (0.6.1) lerobot parents first: `lerobot/policies/__init__.py` imports every policy config
    # incl. `.groot.configuration_groot`; done inside the redirect window it would load the N1.5 GrootConfig and
    # register it with draccus as "groot", breaking a later import of the 0.6.1 (N1.7) GrootConfig.
    importlib.import_module("lerobot.policies")
    importlib.import_module("lerobot.utils.constants")
    importlib.import_module("lerobot.utils.import_utils")
    _make_pkg(ALIAS, pkg_root / ALIAS)
    _make_pkg(f"{ALIAS}.action_head", pkg_root / ALIAS / "action_head")  # its __init__.py is license-only anyway
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == SRC or k.startswith(SRC + ".")}
    finder = _Redirect()
    sys.meta_path.insert(0, finder)
    import dataclasses

    real_dataclass = dataclasses.dataclass
    dataclasses.dataclass = _no_double_dataclass(real_dataclass)
    try:
        g = importlib.import_module(f"{ALIAS}.groot_n1")
    finally:
        dataclasses.dataclass = real_dataclass
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if k == SRC or k.startswith(SRC + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)
        pol = sys.modules.get("lerobot.policies")
        if pol is not None:  # importlib set lerobot.policies.groot = alias pkg; undo that
            if SRC in saved:
                pol.groot = saved[SRC]
            elif getattr(pol, "groot", None) is sys.modules.get(ALIAS):
                delattr(pol, "groot")
    if g.tree is None:
        g.tree = _TreeShim()
    # transformers 5.x from_pretrained instantiates the model under `torch.device("meta")`; the action head builds
    # `torch.distributions.Beta(alpha, beta)` in __init__, whose arg validation calls .item() -> RuntimeError on meta.
    # Build the Beta on CPU (same as a normal, non-meta construction) in the alias module only.
    fm = sys.modules[f"{ALIAS}.action_head.flow_matching_action_head"]
    if not getattr(fm.Beta, "_n15_cpu", False):
        real_beta = fm.Beta

        def _beta_cpu(*a, **kw):
            with torch.device("cpu"):
                return real_beta(*a, **kw)

        _beta_cpu._n15_cpu = True
        fm.Beta = _beta_cpu
    return g


# ----------------------------------------------------------------------------------------------------------------
# tiny model
LLM_HIDDEN, LLM_LAYERS, SELECT_LAYER = 64, 4, 2
IMG_TOKEN, IMG_SIZE, PATCH = 200, 28, 14  # (28/14)^2 = 4 image tokens per image, no pixel shuffle
A_DIM, HORIZON, S_DIM = 8, 4, 10
DIT_LAYERS, VLSA_LAYERS = 4, 2

_PLACEHOLDER_ASSETS = {
    "vocab.json": "{}", "merges.txt": "", "added_tokens.json": "{}", "chat_template.json": "{}",
    "special_tokens_map.json": "{}", "generation_config.json": "{}", "preprocessor_config.json": "{}",
    "processor_config.json": "{}", "tokenizer_config.json": "{}",
}


def write_tiny_eagle_dir(eagle_dir: str | Path = SCRATCH / "tiny_eagle") -> Path:
    eagle_dir = Path(eagle_dir)
    eagle_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Eagle25VLForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_eagle2_5_vl.Eagle25VLConfig",
                     "AutoModel": "modeling_eagle2_5_vl.Eagle25VLForConditionalGeneration"},
        "model_type": "eagle_2_5_vl", "_attn_implementation": "sdpa",
        "downsample_ratio": 0.5, "force_image_size": IMG_SIZE, "image_token_index": IMG_TOKEN,
        "mlp_connector_layers": 1, "use_pixel_shuffle": False, "select_layer": -1,
        "template": "qwen3-chat", "use_backbone_lora": 0, "use_llm_lora": 0,
        "text_config": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                        "hidden_size": LLM_HIDDEN, "intermediate_size": 128, "num_hidden_layers": LLM_LAYERS,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
                        "max_position_embeddings": 128, "tie_word_embeddings": True, "use_cache": False,
                        "rms_norm_eps": 1e-6, "rope_theta": 1000000},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": IMG_SIZE,
                          "patch_size": PATCH, "num_channels": 3},
    }
    (eagle_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    for f, txt in _PLACEHOLDER_ASSETS.items():  # so ensure_eagle_cache_ready never calls hf_hub_download
        if not (eagle_dir / f).exists():
            (eagle_dir / f).write_text(txt)
    return eagle_dir


def tiny_n15_config(g, eagle_dir: Path, dit_layers: int = DIT_LAYERS, vlsa_layers: int = VLSA_LAYERS):
    return g.GR00TN15Config(
        action_dim=A_DIM, action_horizon=HORIZON, compute_dtype="float32", model_dtype="float32",
        hidden_size=LLM_HIDDEN, architectures=["GR00T_N1_5"],
        backbone_cfg={"select_layer": SELECT_LAYER, "project_to_dim": None, "tune_llm": False,
                      "tune_visual": True, "reproject_vision": False, "load_bf16": False,
                      "use_flash_attention": False, "tokenizer_assets_repo": str(eagle_dir)},
        action_head_cfg={
            "action_dim": A_DIM, "action_horizon": HORIZON, "add_pos_embed": True,
            "backbone_embedding_dim": LLM_HIDDEN, "hidden_size": 48, "input_embedding_dim": 32,
            "max_action_dim": A_DIM, "max_state_dim": S_DIM, "max_num_embodiments": 4,
            "num_inference_timesteps": 2, "num_target_vision_tokens": 4, "max_seq_len": 16,
            "noise_beta_alpha": 1.5, "noise_beta_beta": 1.0, "noise_s": 0.999, "num_timestep_buckets": 1000,
            "tune_projector": True, "tune_diffusion_model": True, "use_vlln": True, "model_dtype": "float32",
            "diffusion_model_cfg": {"attention_head_dim": 16, "num_attention_heads": 2,
                                    "cross_attention_dim": LLM_HIDDEN, "dropout": 0.0, "final_dropout": True,
                                    "interleave_self_attention": True, "norm_type": "ada_norm",
                                    "num_layers": dit_layers, "output_dim": 48, "positional_embeddings": None},
            "vl_self_attention_cfg": {"attention_head_dim": 16, "num_attention_heads": 4, "dropout": 0.0,
                                      "final_dropout": True, "num_layers": vlsa_layers,
                                      "positional_embeddings": None},
        },
    )


def build_tiny_n15(seed: int = 0, dit_layers: int = DIT_LAYERS, vlsa_layers: int = VLSA_LAYERS,
                   pkg_root: str | Path = DEFAULT_PKG_ROOT, eagle_dir: str | Path = SCRATCH / "tiny_eagle"):
    g = load_n15_package(pkg_root)
    eagle_dir = write_tiny_eagle_dir(eagle_dir)
    torch.manual_seed(seed)
    return g.GR00TN15(tiny_n15_config(g, eagle_dir, dit_layers, vlsa_layers), local_model_path=str(eagle_dir))


def tiny_inputs(batch: int = 2, seq: int = 10, with_action: bool = True, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150, (batch, seq), generator=gen)
    ids[:, 1:1 + (IMG_SIZE // PATCH) ** 2] = IMG_TOKEN  # one image per sample -> 4 image tokens
    d = {
        "state": torch.randn(batch, 1, S_DIM, generator=gen),
        "embodiment_id": torch.arange(batch) % 4,
        "eagle_pixel_values": torch.randn(batch, 3, IMG_SIZE, IMG_SIZE, generator=gen),
        "eagle_input_ids": ids,
        "eagle_attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "eagle_image_sizes": torch.tensor([[IMG_SIZE, IMG_SIZE]] * batch),  # deleted before eagle forward
    }
    if with_action:
        d["action"] = torch.randn(batch, HORIZON, A_DIM, generator=gen)
        d["action_mask"] = torch.ones(batch, HORIZON, A_DIM)
    return d


if __name__ == "__main__":
    import time

    torch.set_num_threads(1)
    t0 = time.time()
    g = load_n15_package()
    t1 = time.time()
    m = build_tiny_n15(0)
    t2 = time.time()
    m.train()
    loss = m(tiny_inputs())["loss"]
    loss.backward()
    m.eval()
    act = m.get_action(tiny_inputs(with_action=False))["action_pred"]
    t3 = time.time()
    print(f"import {t1 - t0:.2f}s build {t2 - t1:.2f}s fwd+bwd+get_action {t3 - t2:.2f}s")
    print("module:", type(m).__module__, "loss", float(loss), "action_pred", tuple(act.shape))
