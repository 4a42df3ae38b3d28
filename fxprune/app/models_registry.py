"""Model specs for the command line: turn a string into ``(model, example_input)``.

Spec forms:

* ``timm:<name>``: ``timm.create_model(name, pretrained=False)`` (random weights); the input
  is ``(1, C, H, W)`` from the model's pretrained/default config ``input_size``.
* ``torchvision:<name>``: ``torchvision.models.get_model(name, weights=None)``; the input is
  ``(1, 3, S, S)`` with ``S`` the model's ``image_size`` attribute, or 224.
* ``fxprune:<factory>``: a factory of :mod:`fxprune.models.reference` (``tiny_vit``,
  ``digits_vit``), or ``fxprune:<module>.<factory>`` for another module of ``fxprune.models``;
  the input size is read off the built model (patch embedding, or ``img_size``/``in_chans``).
* ``hf:<model id or directory>``: a Hugging Face vision model,
  ``AutoModelForImageClassification.from_pretrained`` (``AutoModel`` for models without a
  classification head): its own weights, from a local directory (``save_pretrained``) or the
  Hub (needs the network); the input is ``(1, C, S, S)`` from the config's ``image_size``
  and ``num_channels``. fx cannot trace these models: the trace goes through torch.export.
* ``path/to/file.py:<factory>``: imports the file and calls ``factory()``. The factory returns
  either ``(model, example_input)`` or a model with an ``example_input`` attribute.

``input_size=(H, W)`` overrides the spatial size: timm and torchvision models are built for it
where they take an ``img_size``/``image_size`` argument, reference factories get ``img_size``,
and the example input's last two dims are replaced. Models are returned in eval mode; example
inputs are drawn from a fixed seed (the global RNG is left alone).

Every failure is an :class:`fxprune.errors.InputError` that says what to type instead.

Example:
    >>> model, x = load_model("fxprune:tiny_vit")
    >>> tuple(x.shape)
    (1, 3, 32, 32)
    >>> load_model("nope:vit")
    Traceback (most recent call last):
    ...
    fxprune.errors.InputError: [fxprune.load_model] unknown model spec 'nope:vit' ...
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import InputError

WHERE = "fxprune.load_model"
PREFIXES = ("timm", "torchvision", "fxprune", "hf")
FORMS = ("timm:<name> (e.g. timm:deit_small_patch16_224), torchvision:<name> (e.g. "
         "torchvision:vit_b_16), fxprune:<factory> (e.g. fxprune:tiny_vit), hf:<model id or "
         "directory> (e.g. hf:google/vit-base-patch16-224), or path/to/file.py:<factory>")

__all__ = ["FORMS", "load_model", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a spec into ``(kind, rest)`` with ``kind`` one of ``timm``, ``torchvision``,
    ``fxprune`` or ``file`` (``rest`` is then ``"path:factory"``).

    Example:
        >>> parse_spec("timm:vit_base_patch16_224")
        ('timm', 'vit_base_patch16_224')
        >>> parse_spec("models/my.py:build")
        ('file', 'models/my.py:build')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(WHERE, f"empty model spec {spec!r}", hint=f"use one of: {FORMS}")
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    if sep and head in PREFIXES:
        if not rest:
            raise InputError(WHERE, f"model spec {spec!r} names no model after '{head}:'",
                             hint=f"use one of: {FORMS}")
        return head, rest
    path, psep, _ = spec.rpartition(":")
    if psep and path.endswith(".py"):
        return "file", spec
    if spec.endswith(".py"):
        raise InputError(WHERE, f"model spec {spec!r} names a file but no factory",
                         hint=f"append the function that builds the model: {spec}:<factory>")
    hint = f"use one of: {FORMS}"
    if not sep:
        guess = _bare_name_guess(spec)
        if guess:
            hint = f"did you mean {guess}? Otherwise use one of: {FORMS}"
    what = f"unknown prefix '{head}:'" if sep else "no prefix"
    raise InputError(WHERE, f"unknown model spec {spec!r} ({what})", hint=hint)


def load_model(spec: str, input_size: Sequence[int] | None = None
               ) -> tuple[nn.Module, torch.Tensor | tuple]:
    """Build the model a spec names and an example input for it (see the module docstring).

    ``input_size`` is ``(H, W)`` (or one int for a square input) or None for the model's own.
    """
    hw = _check_size(input_size)
    kind, rest = parse_spec(spec)
    if kind == "timm":
        model, x = _load_timm(rest, hw)
    elif kind == "torchvision":
        model, x = _load_torchvision(rest, hw)
    elif kind == "fxprune":
        model, x = _load_fxprune(rest, hw)
    elif kind == "hf":
        model, x = _load_hf(rest, hw)
    else:
        model, x = _load_file(rest, hw)
    if _is_exported(model):
        return model, x  # an ExportedProgram keeps the mode it was exported in
    if not isinstance(model, nn.Module):
        raise InputError(WHERE, f"{spec!r} gave a {type(model).__name__}, not an nn.Module",
                         hint="the factory must return an nn.Module, GraphModule or "
                         "ExportedProgram, or (model, input)")
    try:
        model.eval()
    except NotImplementedError:  # ExportedProgram.module() refuses mode switches
        pass
    return model, x


# -- helpers ------------------------------------------------------------------------------

def _check_size(input_size) -> tuple[int, int] | None:
    if input_size is None:
        return None
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(input_size)
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise InputError(WHERE, f"input size must be two positive ints (H W), got {input_size!r}")
    return size  # type: ignore[return-value]


def _randn(shape: Sequence[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen)


def _with_size(x: Any, hw: tuple[int, int] | None) -> Any:
    """Replace the spatial dims of a 4-D example input (keeping batch and channels)."""
    if hw is None:
        return x
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return _randn((x.shape[0], x.shape[1], *hw)).to(x.dtype)
    raise InputError(WHERE, "--input-size needs a 4-D (B, C, H, W) example input, got "
                     f"{_describe(x)}", hint="leave out --input-size for this model")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a value of type {type(x).__name__}"


def _suggest(name: str, names: Sequence[str], n: int = 5) -> list[str]:
    """Names starting with ``name``, then containing it, then close spellings."""
    low = name.lower()
    out = [m for m in names if m.lower().startswith(low)]
    out += [m for m in names if low in m.lower() and m not in out]
    out += [m for m in difflib.get_close_matches(name, names, n=n, cutoff=0.6) if m not in out]
    return out[:n]


def _bare_name_guess(name: str) -> str | None:
    """For a spec without a prefix, say which prefixed spec exists (cheap checks only)."""
    from fxprune.models import reference

    if callable(getattr(reference, name, None)) and name in reference.__all__:
        return f"fxprune:{name}"
    if importlib.util.find_spec("timm") is not None:
        try:
            import timm

            if timm.is_model(name):
                return f"timm:{name}"
        except Exception:  # a broken timm install must not hide the real message
            return None
    return None


def _import(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or torchvision built against another torch
        raise InputError(WHERE, f"cannot import {module}: {type(exc).__name__}: {exc}",
                         hint=f"install it (pip install '{extra}'), or run `make setup`; if the "
                         "error is 'operator torchvision::nms does not exist', torch and "
                         "torchvision do not match (README.md, Quick start)") from exc


def _build(factory: Callable, size_kwarg: str, size_value: Any, what: str, **kwargs) -> nn.Module:
    """Call ``factory`` with ``size_kwarg=size_value`` when a size is given, falling back to
    no size argument for models that do not take one."""
    if size_value is not None:
        try:
            return factory(**kwargs, **{size_kwarg: size_value})
        except TypeError as exc:
            if size_kwarg not in str(exc):
                raise InputError(WHERE, f"building {what} failed: {exc}") from exc
        except Exception as exc:
            raise InputError(WHERE, f"building {what} for input size {size_value} failed: "
                             f"{type(exc).__name__}: {exc}",
                             hint="choose an input size the model supports") from exc
    try:
        return factory(**kwargs)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(WHERE, f"building {what} failed: {type(exc).__name__}: {exc}") from exc


# -- timm ---------------------------------------------------------------------------------

def _load_timm(name: str, hw):
    timm = _import("timm", "fxprune[timm]")
    if not timm.is_model(name):
        arch = name.split(".")[0]
        sugg = _suggest(arch, timm.list_models())
        pattern = f"*{arch.split('_')[0]}*"
        hint = (f"close names: {', '.join(sugg)}. " if sugg else "") + \
            f"List models with: python -c \"import timm; print(timm.list_models('{pattern}'))\""
        raise InputError(WHERE, f"timm has no model named {name!r}", hint=hint)
    size = None if hw is None else (hw[0] if hw[0] == hw[1] else hw)
    model = _build(lambda **kw: timm.create_model(name, pretrained=False, **kw), "img_size", size,
                   f"timm model {name!r}")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    chans, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    if hw is not None:
        h, w = hw
    return model, _randn((1, chans, h, w))


# -- torchvision --------------------------------------------------------------------------

def _load_torchvision(name: str, hw):
    tv = _import("torchvision", "fxprune[timm]")
    names = tv.models.list_models()
    if name not in names:
        sugg = _suggest(name, names)
        hint = (f"close names: {', '.join(sugg)}. " if sugg else "") + \
            "List models with: python -c \"import torchvision; " \
            "print(torchvision.models.list_models())\""
        raise InputError(WHERE, f"torchvision has no model named {name!r}", hint=hint)
    size = None
    if hw is not None:
        if hw[0] != hw[1] and "vit" in name:
            raise InputError(WHERE, f"torchvision's {name} takes square inputs only, got {hw}")
        size = hw[0]
    model = _build(lambda **kw: tv.models.get_model(name, weights=None, **kw), "image_size",
                   size, f"torchvision model {name!r}")
    s = getattr(model, "image_size", 224)
    h, w = hw if hw is not None else (s, s)
    return model, _randn((1, 3, h, w))


# -- Hugging Face -------------------------------------------------------------------------

def _load_hf(name: str, hw):
    transformers = _import("transformers", "transformers")
    last = None
    for auto in ("AutoModelForImageClassification", "AutoModel"):
        try:
            model = getattr(transformers, auto).from_pretrained(name)
            break
        except ValueError as exc:  # this auto class does not know the architecture
            last = exc
        except OSError as exc:
            raise InputError(WHERE, f"Hugging Face has no model {name!r} here: "
                             f"{str(exc).splitlines()[0]}", hint="give a directory written by "
                             "save_pretrained, or a Hub id on a machine with network access"
                             ) from exc
    else:
        raise InputError(WHERE, f"{name!r} is not a model transformers' auto classes build: "
                         f"{str(last).splitlines()[0]}", hint="write a file.py:<factory> "
                         "that builds it") from last
    cfg = model.config
    size = getattr(cfg, "image_size", 224)
    h, w = hw if hw is not None else ((size, size) if isinstance(size, int) else tuple(size))
    return model, _randn((1, getattr(cfg, "num_channels", 3), h, w))


# -- fxprune.models -----------------------------------------------------------------------

def _load_fxprune(rest: str, hw):
    module_name, _, fname = rest.rpartition(".")
    module_name = module_name or "reference"
    full = f"fxprune.models.{module_name}"
    if importlib.util.find_spec(full) is None:
        raise InputError(WHERE, f"no module {full}", hint="fxprune:<factory> looks in "
                         "fxprune.models.reference; fxprune:<module>.<factory> elsewhere")
    module = importlib.import_module(full)
    factory = getattr(module, fname, None)
    public = [n for n in getattr(module, "__all__", dir(module))
              if n[:1].islower() and callable(getattr(module, n, None))]
    if not callable(factory) or fname.startswith("_"):
        sugg = _suggest(fname, public)
        raise InputError(WHERE, f"{full} has no model factory {fname!r}",
                         hint=f"factories there: {', '.join(public) or 'none'}"
                         + (f" (close: {', '.join(sugg)})" if sugg else ""))
    size = None
    if hw is not None:
        if hw[0] != hw[1]:
            raise InputError(WHERE, f"fxprune:{rest} builds square inputs only, got {hw}")
        size = hw[0]
    model = _build(factory, "img_size", size, f"fxprune:{rest}")
    if isinstance(model, tuple):  # a factory of (model, input)
        model, x = model
        return model, _with_size(x, hw)
    x = _input_from_attributes(model)
    if x is None:
        raise InputError(WHERE, f"cannot tell the input size of fxprune:{rest}",
                         hint="give it with --input-size H W")
    return model, _with_size(x, hw) if hw is not None and tuple(x.shape[-2:]) != hw else x


def _input_from_attributes(model: nn.Module) -> torch.Tensor | None:
    """``(1, C, H, W)`` from an ``example_input`` attribute, ``img_size``/``in_chans``
    attributes, or a patch embedding conv (``patch_embed.proj`` and ``grid_size``)."""
    x = getattr(model, "example_input", None)
    if isinstance(x, torch.Tensor):
        return x
    img = getattr(model, "img_size", None)
    chans = getattr(model, "in_chans", None)
    pe = getattr(model, "patch_embed", None)
    conv = getattr(pe, "proj", None)
    if chans is None and isinstance(conv, nn.Conv2d):
        chans = conv.in_channels
    if img is None and isinstance(conv, nn.Conv2d) and getattr(pe, "grid_size", None):
        grid = pe.grid_size
        grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        img = (grid[0] * conv.stride[0], grid[1] * conv.stride[1])
    if img is None or chans is None:
        return None
    img = (img, img) if isinstance(img, int) else tuple(img)
    return _randn((1, chans, *img))


# -- path/to/file.py:factory --------------------------------------------------------------

def _load_file(spec: str, hw):
    path_s, _, fname = spec.rpartition(":")
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise InputError(WHERE, f"model file {path_s!r} does not exist",
                         hint=f"give a path relative to {Path.cwd()} or an absolute path")
    if not fname.isidentifier():
        raise InputError(WHERE, f"{fname!r} in {spec!r} is not a function name",
                         hint="use path/to/file.py:<factory>")
    module = _import_file(path)
    factory = getattr(module, fname, None)
    if not callable(factory):
        public = [n for n, v in vars(module).items()
                  if not n.startswith("_") and inspect.isfunction(v)
                  and v.__module__ == module.__name__]
        raise InputError(WHERE, f"{path_s} has no callable {fname!r}",
                         hint=f"functions defined there: {', '.join(public) or 'none'}")
    try:
        out = factory()
    except Exception as exc:
        raise InputError(WHERE, f"{path_s}:{fname}() failed: {type(exc).__name__}: {exc}",
                         hint="the factory is called with no arguments") from exc
    if isinstance(out, tuple | list) and len(out) == 2 and _is_model(out[0]):
        model, x = out
        return model, _with_size(x, hw)
    if _is_exported(out):
        args = tuple(out.example_inputs[0]) if out.example_inputs else ()
        if args and all(isinstance(a, torch.Tensor) for a in args):
            return out, _with_size(args[0] if len(args) == 1 else args, hw)
    if not isinstance(out, nn.Module):
        raise InputError(WHERE, f"{path_s}:{fname}() returned {_describe(out)}",
                         hint="return an nn.Module, GraphModule or ExportedProgram, or "
                         "(model, example_input)")
    x = getattr(out, "example_input", None)
    if x is not None:
        return out, _with_size(x, hw)
    if hw is not None:
        return out, _randn((1, 3, *hw))
    raise InputError(WHERE, f"{path_s}:{fname}() returned a model without an example input",
                     hint="return (model, example_input), set model.example_input, or give "
                     "--input-size H W for a (1, 3, H, W) input")


def _is_exported(obj) -> bool:
    cls = getattr(torch.export, "ExportedProgram", None)
    return cls is not None and isinstance(obj, cls)


def _is_model(obj) -> bool:
    """An nn.Module (GraphModules included) or a torch.export.ExportedProgram."""
    return isinstance(obj, nn.Module) or _is_exported(obj)


def _import_file(path: Path):
    path = path.resolve()
    name = f"_fxprune_user_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(WHERE, f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # sibling imports of the user's file
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise InputError(WHERE, f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module
