"""The model families SAMS Explorer knows, each declared once: name, label, summary, options,
capabilities and the class that implements it.

The command line builds its per-family flags from the options, the Train page its widgets, the
manifest and the pages their labels, and :func:`sams_core.training.build.build_for_data` its checks
from the capabilities. A new family is one :func:`register` call (its class a
:class:`~sams_core.models.base.PerturbationModel` subclass):

    register(FamilySpec(
        name="my_vae", label="My VAE", summary="One line on what it models.",
        class_path="my_package.my_vae:MyVAE",
        options=(Option("beta", float, 1.0, "weight of the prior", low=0.0),),
        capabilities=Capabilities(has_masks=False, composes_unseen_combinations=True),
    ))

This module loads without PyTorch (labels and options are read by pages and ``--help``, which
never touch a model); a family's class is imported the first time a model of it is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sams_core.errors import SamsError

if TYPE_CHECKING:
    from sams_core.models.base import PerturbationModel

    FAMILIES: tuple[str, ...]  # module attribute computed on access, see __getattr__

LIKELIHOODS: tuple[str, ...] = ("nb", "poisson", "gaussian")
"""Likelihoods of expression given decoder output (see :class:`sams_core.models.distributions.Likelihood`)."""

_TYPES: tuple[type, ...] = (int, float, str, bool)


@dataclass(frozen=True)
class Option:
    """One hyper-parameter a family offers to users, with what the CLI and the Train page need.

    ``name`` is the keyword of the family's constructor; ``type`` one of int, float, str, bool;
    ``default`` the value the model takes when the option is not given; ``choices`` the allowed
    values (or None); ``flag`` the command-line flag (default ``--`` + name with dashes);
    ``low``/``high`` bounds of a number (``low_open``/``high_open``: the bound itself excluded);
    ``none_allowed``: None is a meaningful value (written ``none`` on the command line);
    ``label``: how the model's label shows a value other than the default when the family names
    this option in ``label_options`` (a format string, e.g. ``"tempered ×{:g}"``; empty: the value
    itself, always).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    flag: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none_allowed: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise SamsError(f"Option name {self.name!r} is not a Python identifier. Name it after the constructor keyword.")
        if self.type not in _TYPES:
            raise SamsError(f"Option {self.name!r} has type {self.type!r}. Use one of int, float, str, bool.")
        if not self.flag:
            object.__setattr__(self, "flag", "--" + self.name.replace("_", "-"))
        if not self.flag.startswith("--"):
            raise SamsError(f"Option {self.name!r} has flag {self.flag!r}. Flags start with '--'.")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        self.validate(self.default)  # a default the option itself refuses is a declaration error

    @property
    def dest(self) -> str:
        """The attribute name of the parsed flag on an ``argparse`` namespace."""
        return self.flag[2:].replace("-", "_")

    def requirement(self) -> str:
        """What a valid value is, in words, e.g. "a number in [0, 1) or none"."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.type is bool:
            text = "true or false"
        elif self.type in (int, float) and (self.low is not None or self.high is not None):
            lo = "(" if self.low_open or self.low is None else "["
            hi = ")" if self.high_open or self.high is None else "]"
            lo_v = "-inf" if self.low is None else f"{self.low:g}"
            hi_v = "inf" if self.high is None else f"{self.high:g}"
            text = f"{'an integer' if self.type is int else 'a number'} in {lo}{lo_v}, {hi_v}{hi}"
        else:
            text = {int: "an integer", float: "a number", str: "text"}[self.type]
        return text + (" or none" if self.none_allowed else "")

    def _refuse(self, value: Any) -> SamsError:
        return SamsError(
            f"Option {self.name} ({self.flag}) must be {self.requirement()}, got {value!r}. Pass a value in that range."
        )

    def validate(self, value: Any) -> Any:
        """``value`` checked against the type, choices and bounds (ints widen to floats);
        raises :class:`SamsError` naming the option and what it accepts."""
        if value is None:
            if self.none_allowed:
                return None
            raise self._refuse(value)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise self._refuse(value)
        if self.choices is not None and value not in self.choices:
            raise self._refuse(value)
        if self.type in (int, float):
            if isinstance(value, float) and math.isnan(value):
                raise self._refuse(value)
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise self._refuse(value)
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                raise self._refuse(value)
        return value

    def parse(self, text: str) -> Any:
        """The value of ``text`` as written on the command line (``none`` for None where allowed)."""
        t = text.strip()
        if self.none_allowed and t.lower() == "none":
            return None
        if self.type is bool:
            words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            if t.lower() not in words:
                raise self._refuse(text)
            return words[t.lower()]
        try:
            value = self.type(t)
        except ValueError:
            raise self._refuse(text) from None
        return self.validate(value)


@dataclass(frozen=True)
class Capabilities:
    """What a family can do, for the checks before training and for choosing what to show.

    ``has_masks``: it learns which latent units each perturbation acts on (mask probabilities);
    ``composes_unseen_combinations``: it predicts a combination it never saw from its members;
    ``likelihoods``: the likelihoods it accepts; ``needs_counts``: it needs raw counts (not
    log-normalised data); ``one_condition_per_cell``: it learns each condition (a combination
    included) as a label of its own.
    """

    has_masks: bool = False
    composes_unseen_combinations: bool = True
    likelihoods: tuple[str, ...] = LIKELIHOODS
    needs_counts: bool = False
    one_condition_per_cell: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """A model family as users see it: ``name`` (stored in bundles), ``label`` (shown), a one-line
    ``summary``, its ``options``, its ``capabilities`` and ``class_path`` (``"module:Class"``).

    ``label_options`` names options whose value the label shows, e.g. "SAMS-VAE (correlated)"; an
    option with a ``label`` format is shown only when it differs from its default, e.g.
    "SAMS-VAE (mean-field, tempered ×15)".
    """

    name: str
    label: str
    summary: str
    class_path: str
    options: tuple[Option, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)
    label_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise SamsError(f"Family {self.name!r} declares an option twice ({', '.join(names)}). Declare each once.")
        for n in self.label_options:
            if n not in names:
                raise SamsError(f"Family {self.name!r} shows option {n!r} in its label but has no such option. Declare it.")

    def option(self, name: str) -> Option:
        """The option called ``name``."""
        for o in self.options:
            if o.name == name:
                return o
        raise SamsError(f"{self.label} has no option {name!r}. Its options: {', '.join(o.name for o in self.options) or 'none'}.")

    def defaults(self) -> dict[str, Any]:
        """Each option's default value."""
        return {o.name: o.default for o in self.options}

    def check(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """``hparams`` with this family's options validated (:meth:`Option.validate`); other
        hyper-parameters pass through untouched."""
        out = dict(hparams)
        for o in self.options:
            if o.name in out:
                out[o.name] = o.validate(out[o.name])
        return out


_SPECS: dict[str, FamilySpec] = {}
_CLASSES: dict[str, type] = {}


def register(spec: FamilySpec, cls: type | None = None) -> FamilySpec:
    """Add a family. ``cls`` (a :class:`PerturbationModel` subclass whose ``family`` is
    ``spec.name``) may be given directly; otherwise ``spec.class_path`` is imported on first use.

    Raises :class:`SamsError` for a name already taken or a flag another family uses for a
    different option. Returns the spec as registered.
    """
    if spec.name in _SPECS:
        raise SamsError(f"Model family {spec.name!r} is already registered. Pick another name or unregister() it first.")
    if cls is not None:
        if getattr(cls, "family", None) != spec.name:
            raise SamsError(f"{cls.__name__}.family is {getattr(cls, 'family', None)!r}, not {spec.name!r}. Set family = {spec.name!r} on the class.")
        if not spec.class_path:
            spec = dataclasses.replace(spec, class_path=f"{cls.__module__}:{cls.__qualname__}")
    elif ":" not in spec.class_path:
        raise SamsError(f"Family {spec.name!r} has class_path {spec.class_path!r}. Write it as 'package.module:Class' or pass cls.")
    for other in _SPECS.values():
        for mine in spec.options:
            for theirs in other.options:
                if mine.flag == theirs.flag and (mine.name, mine.type, mine.choices, mine.none_allowed) != (
                    theirs.name, theirs.type, theirs.choices, theirs.none_allowed
                ):
                    raise SamsError(
                        f"Family {spec.name!r} option {mine.name!r} uses flag {mine.flag}, which {other.name!r} uses for "
                        f"option {theirs.name!r} of another kind. Give it another flag."
                    )
    _SPECS[spec.name] = spec
    if cls is not None:
        _CLASSES[spec.name] = cls
    return spec


def unregister(name: str) -> None:
    """Remove a family (for plug-ins and tests that register one for a while)."""
    get(name)
    del _SPECS[name]
    _CLASSES.pop(name, None)


def get(name: str) -> FamilySpec:
    """The spec of family ``name``; :class:`SamsError` naming the known families otherwise."""
    spec = _SPECS.get(name)
    if spec is None:
        raise SamsError(f"Unknown model family {name!r}. Choose one of: {', '.join(_SPECS)}.")
    return spec


def families() -> list[FamilySpec]:
    """Every registered family, in the order registered."""
    return list(_SPECS.values())


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of the families this package ships, known to any new process
    (a family registered at run time exists only in the process that registered it)."""
    return name in _BUILTIN


_BUILTIN: set[str] = set()


class _Labels(Mapping[str, str]):
    """Family name -> label, read from the registry at each access."""

    def __getitem__(self, name: str) -> str:
        return _SPECS[name].label

    def __iter__(self) -> Iterator[str]:
        return iter(list(_SPECS))

    def __len__(self) -> int:
        return len(_SPECS)

    def __repr__(self) -> str:
        return repr(dict(self))


FAMILY_LABELS: Mapping[str, str] = _Labels()
"""Family name -> label; a live view of the registry."""


def __getattr__(name: str) -> Any:
    """``FAMILIES``: the registered family names, in order, as a tuple (read at each access; code
    that must see families registered later calls :func:`families`)."""
    if name == "FAMILIES":
        return tuple(_SPECS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_class(family: str) -> type[PerturbationModel]:
    """The ``torch.nn.Module`` class of ``family`` (imported on first use)."""
    spec = get(family)
    cls = _CLASSES.get(family)
    if cls is None:
        module, _, attr = spec.class_path.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise SamsError(
                f"Model family {family!r} points to {spec.class_path}, which cannot be imported ({exc}). "
                "Install the package that provides it or fix its class_path."
            ) from exc
        if getattr(cls, "family", None) != family:
            raise SamsError(f"{spec.class_path} has family {getattr(cls, 'family', None)!r}, not {family!r}. Set family = {family!r} on the class.")
        _CLASSES[family] = cls
    return cls


def build_model(family: str, **hparams: Any) -> PerturbationModel:
    """A fresh model of ``family`` from its hyper-parameters (as stored in ``model.hparams``);
    the family's options are validated first (:meth:`FamilySpec.check`)."""
    spec = get(family)
    return model_class(family)(**spec.check(hparams))


def label(manifest_or_family: Mapping[str, Any] | str, hparams: Mapping[str, Any] | None = None) -> str:
    """Human name of a model, e.g. "SAMS-VAE (correlated)": from a bundle manifest, or from a
    family name and its hyper-parameters. An unknown family is shown by its name."""
    if isinstance(manifest_or_family, str):
        family, hp = manifest_or_family, hparams or {}
    else:
        family = manifest_or_family.get("family") or "?"
        hp = (manifest_or_family.get("hparams") or {}) if hparams is None else hparams
    spec = _SPECS.get(family)
    if spec is None:
        return str(family)
    shown = []
    for n in spec.label_options:
        opt, value = spec.option(n), hp.get(n)
        if opt.label:
            value = opt.default if n not in hp else value
            if value != opt.default:
                shown.append(opt.label.format(value) if value is not None else f"{n} none")
        elif value not in (None, ""):
            shown.append(str(value))
    return f"{spec.label} ({', '.join(shown)})" if shown else spec.label


# ---- the built-in families -------------------------------------------------------------------

def _builtin(name: str, label: str, cls: str, summary: str, **declared: Any) -> None:
    """Register one of the families this package ships (``cls``: module:Class in sams_core.models)."""
    options, label_options = tuple(declared.pop("options", ())), tuple(declared.pop("label_options", ()))
    register(FamilySpec(name, label, summary, f"sams_core.models.{cls}", options, Capabilities(**declared), label_options))
    _BUILTIN.add(name)


_GUIDE = Option(
    "guide", str, "mean-field", "guide over the perturbation embeddings (correlated: q(E | M))",
    choices=("mean-field", "correlated"),
)

_COVARIATE_SHIFT = Option(
    "covariate_shift", bool, False, "option beyond the paper: each perturbation's shift also gets an offset per level "
    "of the primary covariate (e.g. the same label activating a gene in one cell line and knocking it down in "
    "another); needs covariates", label="covariate-specific shifts",
)

_builtin(
    "sams_vae", "SAMS-VAE", "sams_vae:SAMSVAE",
    "Sparse additive mechanism shifts: each perturbation moves a few latent units, a combination the sum of its members' shifts.",
    has_masks=True, composes_unseen_combinations=True, label_options=("guide", "global_weight", "covariate_shift"), options=(
        _GUIDE,
        Option("mask_prior", float, 0.01, "prior probability α that a perturbation acts on a latent unit",
               low=0.0, high=1.0, low_open=True, high_open=True),
        # the training schedule: align, optionally prune at a temporary weight, end on the final objective
        Option("align_at", float, 0.25, "fraction of the budget after which the latent basis is turned to the sparsest "
               "rotation of the perturbation shifts ('none': never)",
               low=0.0, high=1.0, high_open=True, none_allowed=True),
        Option("sparsify_weight", float, 30.0, "temporary weight of the prior terms named by sparsify_terms for "
               "sparsify_for of the budget after the alignment (1: none)", low=0.0),
        Option("sparsify_terms", str, "all", "which prior terms carry sparsify_weight: all global terms (masks and "
               "embeddings) or the masks' alone", choices=("all", "masks")),
        Option("sparsify_for", float, 0.5, "fraction of the budget after the alignment trained at sparsify_weight, "
               "before the final phase", low=0.0, high=1.0, high_open=True),
        Option("global_weight", float, 1.0, "weight of the mask and embedding prior terms in the final objective: "
               "1 = the paper's ELBO (the SAMS-VAE posterior); any other value trains a tempered posterior",
               low=0.0, label="tempered ×{:g}"),
        _COVARIATE_SHIFT,
    ),
)
_builtin(
    "cpa_vae", "CPA-VAE", "cpa_vae:CPAVAE",
    "SAMS-VAE without masks: every perturbation shifts every latent unit; combinations add.",
    has_masks=False, composes_unseen_combinations=True, options=(_GUIDE, _COVARIATE_SHIFT), label_options=("covariate_shift",),
)
_builtin(
    "conditional_vae", "Conditional VAE", "conditional_vae:ConditionalVAE",
    "Perturbations enter only through the decoder's input [z, d]; no global latents.",
    has_masks=False, composes_unseen_combinations=True,
)
_builtin(
    "vae", "VAE", "vae:VAE",
    "No perturbation input: the latent-recovery baseline; every condition looks like the whole screen.",
    has_masks=False, composes_unseen_combinations=False,
)
_builtin(
    "svae_plus", "sVAE+", "svae:SVAEPlus",
    "Sparse mechanism shift with one label per cell: each condition, a combination included, learns its own sparse shift.",
    has_masks=True, composes_unseen_combinations=False, one_condition_per_cell=True,
    label_options=("beta", "align_at"),
    options=(
        Option("beta", float, 10.0, "Beta(1, β) mask prior (β > 1 is sparse, β = 1 flat)", low=0.0, low_open=True,
               label="β={:g}"),
        Option("align_at", float, None, "tuned variant: fraction of the budget after which the latent basis is turned "
               "to the sparsest rotation of the condition shifts ('none': never, as published)",
               low=0.0, high=1.0, high_open=True, none_allowed=True, label="aligned at {:g}"),
    ),
)


__all__ = [
    "FAMILIES",
    "FAMILY_LABELS",
    "LIKELIHOODS",
    "Capabilities",
    "FamilySpec",
    "Option",
    "build_model",
    "families",
    "get",
    "label",
    "model_class",
    "register",
    "unregister",
]
