"""OpenAI's original CLIP archives (`ViT-B-32.pt`, `RN50.pt`, ...): their tensors read without running their code.

Such a file is a TorchScript archive, a zip:

    ROOT/data.pkl        the module tree, pickled: each module an object of a class `__torch__.<...>` whose
                         state is a dict of its attributes (tensors, submodules, flags)
    ROOT/data/<key>      the raw bytes of each tensor storage, referenced from data.pkl by key
    ROOT/code/**.py      TorchScript source: the classes' methods, and for each class the lists
                         `__parameters__ = [...]` and `__buffers__ = [...]`
    ROOT/constants.pkl   tensors the traced graph uses as constants (not weights: not read)

`torch.jit.load` would compile and run that code (a class's `__setstate__` among it), and
`torch.load(weights_only=True)` refuses TorchScript archives. So clipkit reads one this way:

1. data.pkl is unpickled by torch's own weights-only unpickler (`torch._weights_only_unpickler`, the one
   `torch.load(weights_only=True)` uses: it allows only tensor and storage rebuilding, plain containers and
   the globals it is told are safe, and refuses every other global, call or object construction). The
   `__torch__.*` class names the pickle mentions (found first by reading its opcodes, without executing any)
   are allowed as inert containers: classes with no methods, whose instances only collect the attribute
   dict the pickle gives them. TorchScript's own pure helpers (`torch.jit._pickle.restore_type_tag` and the
   `build_*list` functions, which return their argument) are allowed too. Nothing else: a `__reduce__`
   payload (os.system, eval, ...) is refused before anything is called.
2. Storages are read from ROOT/data/<key> as bytes (their size checked against the pickle's count).
3. The code files are read as text, never compiled or run: only the `__parameters__` / `__buffers__` lists
   are taken from them (parsed with ast.literal_eval, which evaluates literals only), so the state dict is
   exactly TorchScript's `state_dict()`: parameters and buffers by their dotted module path, nothing else.

The state dict's names are open_clip's (OpenAI's module layout is open_clip's CLIP), and the architecture is
read from the tensor shapes as open_clip's `build_model_from_openai_state_dict` does, with QuickGELU (OpenAI's
models were trained with it); the image preprocessing is OpenAI's (bicubic resize of the shortest edge, a center
crop, OpenAI's mean and std: open_clip's defaults) and the tokenizer open_clip's BPE.
"""
from __future__ import annotations

import ast
import io
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from ..checkpoint import CheckpointError

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # buffers that are not weights
JIT_PURE_HELPERS = ("restore_type_tag", "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                    "build_tensor_from_id")


class TorchScriptError(CheckpointError):
    """A TorchScript archive clipkit cannot read as an OpenAI CLIP model; the message names why."""


def is_torchscript_archive(path: Path) -> bool:
    """A zip with TorchScript's records (data.pkl with code/ or constants.pkl), as torch.jit.save writes."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/__torch__/" in n for n in names)


class ScriptObject:
    """An inert stand-in for a TorchScript class instance: no methods, only the attributes the pickle sets."""
    qualified_name = ""


def _container(qualified_name: str) -> type:
    return type("ScriptObject", (ScriptObject,), {"qualified_name": qualified_name})


def _script_globals(data: bytes) -> list[str]:
    """The `__torch__.*` names data.pkl refers to, read from its opcodes (nothing is executed)."""
    names = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            if module.startswith("__torch__"):
                names.add(f"{module}.{name}")
        elif op.name == "STACK_GLOBAL":  # TorchScript writes GLOBAL; names built on the stack are not allowed
            raise TorchScriptError("its data.pkl builds global names on the stack (STACK_GLOBAL), which "
                                   "TorchScript does not write")
    return sorted(names)


def _state_lists(z: zipfile.ZipFile, root: str) -> dict[str, tuple[list, list]]:
    """qualified class name -> (parameter names, buffer names), read as text from the code files."""
    lists: dict[str, tuple[list, list]] = {}
    prefix = f"{root}/code/"
    for name in z.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix):-len(".py")].replace("/", ".")
        text = z.read(name).decode("utf-8", "replace")
        for block in re.split(r"^(?=class )", text, flags=re.M):
            head = re.match(r"class (\w+)\(Module\):", block)
            if head is None:
                continue
            found = [re.search(rf"^  {key} = (\[.*?\])$", block, flags=re.M) for key in ("__parameters__",
                                                                                       "__buffers__")]
            if None in found:
                continue
            try:
                params, buffers = (ast.literal_eval(m.group(1)) for m in found)
            except (ValueError, SyntaxError):
                raise TorchScriptError(f"its code file {name} lists parameters it cannot parse") from None
            lists[f"{module}.{head.group(1)}"] = (list(params), list(buffers))
    return lists


def _storage_loader(z: zipfile.ZipFile, root: str):
    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise TorchScriptError("its data.pkl refers to a storage in an unknown way")
        _, storage_type, key, _location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        try:
            data = z.read(f"{root}/data/{key}")
        except KeyError:
            raise TorchScriptError(f"its tensor record data/{key} is missing") from None
        size = numel * torch._utils._element_size(dtype)
        if len(data) != size:
            raise TorchScriptError(f"its tensor record data/{key} holds {len(data)} bytes, the pickle says {size}")
        untyped = torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage() if data else \
            torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
    return persistent_load


def _unpickle(data: bytes, z: zipfile.ZipFile, root: str):
    """data.pkl through torch's weights-only unpickler, `__torch__` classes allowed as inert containers."""
    import pickle

    import torch.jit._pickle as jit_pickle

    try:
        from torch._weights_only_unpickler import Unpickler  # what torch.load(weights_only=True) runs
    except ImportError:
        raise TorchScriptError(f"torch {torch.__version__} has no weights-only unpickler to read it with") from None
    try:
        allowed = [(_container(name), name) for name in _script_globals(data)]
        allowed += [(getattr(jit_pickle, f), f"torch.jit._pickle.{f}") for f in JIT_PURE_HELPERS
                    if hasattr(jit_pickle, f)]
        unpickler = Unpickler(io.BytesIO(data), encoding="utf-8")
        unpickler.persistent_load = _storage_loader(z, root)
        with torch.serialization.safe_globals(allowed):
            return unpickler.load()
    except TorchScriptError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TorchScriptError(f"its data.pkl holds more than modules and tensors ({reason})") from None


def _module_state(obj: ScriptObject, lists: dict, prefix: str = "") -> dict:
    """TorchScript's state_dict(): each module's parameters and buffers, then its submodules', by dotted path."""
    name = type(obj).qualified_name
    if name not in lists:
        raise TorchScriptError(f"its code has no __parameters__/__buffers__ for class {name[:120]}")
    params, buffers = lists[name]
    attrs = obj.__dict__
    state = {}
    for key in params + buffers:
        value = attrs.get(key)
        if value is None:  # an optional parameter left unset (a Linear without bias)
            continue
        if not torch.is_tensor(value):
            raise TorchScriptError(f"its attribute {prefix}{key} is listed as a parameter but holds no tensor")
        state[f"{prefix}{key}"] = value
    for key, value in attrs.items():
        if isinstance(value, ScriptObject):
            state.update(_module_state(value, lists, f"{prefix}{key}."))
    return state


def read_torchscript_state(path: Path) -> dict:
    """The archive's state dict, read without running any of its code (see the module docstring)."""
    try:
        with zipfile.ZipFile(path) as z:
            root = z.namelist()[0].split("/", 1)[0]
            try:
                data = z.read(f"{root}/data.pkl")
            except KeyError:
                raise TorchScriptError("it has no data.pkl") from None
            lists = _state_lists(z, root)
            obj = _unpickle(data, z, root)
            if not isinstance(obj, ScriptObject):
                raise TorchScriptError("its data.pkl holds no module")
            return _module_state(obj, lists)
    except TorchScriptError as e:
        raise TorchScriptError(f"{path}: refused, not an OpenAI CLIP TorchScript archive clipkit can read without "
                               f"running its code: {e}") from None
    except (zipfile.BadZipFile, OSError, IndexError) as e:
        raise TorchScriptError(f"{path}: not a readable TorchScript archive ({e})") from None


def openai_model_config(path: Path, state: dict) -> dict:
    """open_clip's model_cfg for an OpenAI state dict, as build_model_from_openai_state_dict infers it."""
    try:
        if "visual.proj" in state:  # a ViT
            width = state["visual.conv1.weight"].shape[0]
            layers = len([k for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
            patch = state["visual.conv1.weight"].shape[-1]
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {"layers": layers, "width": width, "patch_size": patch, "image_size": patch * grid}
        else:  # a ModifiedResNet
            layers = [len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            width = state["visual.layer1.0.conv1.weight"].shape[0]
            side = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {"layers": layers, "width": width, "image_size": side * 32, "patch_size": None}
        text_width = state["ln_final.weight"].shape[0]
        text = {"context_length": state["positional_embedding"].shape[0],
                "vocab_size": state["token_embedding.weight"].shape[0], "width": text_width,
                "heads": text_width // 64,
                "layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks")})}
        return {"embed_dim": state["text_projection"].shape[1], "quick_gelu": True, "vision_cfg": vision,
                "text_cfg": text}
    except (KeyError, IndexError) as e:
        raise TorchScriptError(f"{path}: a TorchScript archive without OpenAI CLIP's tensors (no {e}): clipkit "
                               "reads OpenAI's CLIP archives only") from None


def openai_state(model: torch.nn.Module, state: dict) -> dict:
    """What open_clip drops from an OpenAI state dict before loading it: sizes kept as buffers."""
    return {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}
