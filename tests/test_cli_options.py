"""Every option of `phds train`, `serve`, `bench`, `eval`, `sweep`, `compare` and `allocate` is a field of the
config (or a parameter of the function) the command calls, with the same default: the CLI's defaults cannot drift
from the Python API's.

An option whose name differs from its field, or whose value is converted on the way (a 'k list' string, a flag
that negates its field), is listed below with the conversion; nothing else may differ.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import typer

from phds.allocation import allocate
from phds.bench import BenchConfig
from phds.cli import app
from phds.cli.common import parse_ks
from phds.evaluation import compare, evaluate, sweep
from phds.serving import ServeConfig
from phds.training import PHDSConfig, train

REQUIRED = object()


def _same(value):
    return value


def _ks(text):
    return None if text is None else parse_ks(text)


def _names(text):
    return [name.strip() for name in text.split(",")]


# option -> (the field or parameter it sets, how the option's default becomes that field's value)
TRAIN_RENAMES = {
    "data": ("train_data", _same),
    "out": ("output_dir", _same),
    "k": ("ks", _ks),
    "eval_k": ("eval_ks", _ks),
    "epochs": ("num_train_epochs", _same),
    "batch_size": ("per_device_train_batch_size", _same),
    "grad_accum": ("gradient_accumulation_steps", _same),
    "text_column": ("dataset_text_field", _same),
    "gradient_checkpointing": ("activation_checkpointing", lambda on: on or None),  # None is off as well
    "freeze_router": ("train_router", lambda freeze: not freeze),
    "resume": ("resume_from_checkpoint", lambda resume: "last" if resume else None),
}
BENCH_RENAMES = {
    "k": ("ks", _ks),
    "batch": ("batches", _ks),
    "stock": ("stock", _names),
    "json_out": (None, _same),  # where the command writes its results: no field of the measurement
}
EVAL_RENAMES = {"out": ("out_dir", _same), "k": ("ks", _ks), "tasks": ("tasks", lambda text: tuple(_names(text)))}


def _fields(config_class) -> dict:
    defaults = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        else:
            defaults[field.name] = REQUIRED
    return defaults


def _parameters(*functions) -> dict:
    defaults = {}
    for function in functions:
        for name, parameter in inspect.signature(function).parameters.items():
            if (
                parameter.kind is inspect.Parameter.KEYWORD_ONLY
                or parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            ):
                empty = parameter.default is inspect.Parameter.empty
                defaults.setdefault(name, REQUIRED if empty else parameter.default)
    return defaults


CASES = {
    "train": (lambda: {**_fields(PHDSConfig), **_parameters(train)}, TRAIN_RENAMES),
    "serve": (lambda: _fields(ServeConfig), {}),
    "bench": (lambda: _fields(BenchConfig), BENCH_RENAMES),
    "eval": (lambda: _parameters(evaluate), EVAL_RENAMES),
    "sweep": (lambda: _parameters(sweep, evaluate), EVAL_RENAMES),
    "compare": (lambda: _parameters(compare), {"out": ("out_dir", _same)}),
    "allocate": (lambda: _parameters(allocate), {"out": (None, _same)}),  # --out: where the allocation is written
}


@pytest.mark.parametrize("command", list(CASES))
def test_every_option_is_a_field_with_the_same_default(command):
    owner_defaults, renames = CASES[command][0](), CASES[command][1]
    options = typer.main.get_command(app).commands[command].params
    mismatches = []
    for option in options:
        field, convert = renames.get(option.name, (option.name, _same))
        if field is None:
            continue
        if field not in owner_defaults:
            mismatches.append(f"--{option.name}: no field `{field}`")
        elif option.required or owner_defaults[field] is REQUIRED:
            continue  # no default on one side (`phds eval --k` may default where `evaluate(ks)` must be given)
        elif convert(option.default) != owner_defaults[field]:
            mismatches.append(f"--{option.name}: {option.default!r}, `{field}` defaults to {owner_defaults[field]!r}")
    assert not mismatches, f"`phds {command}` options differ from what they set: {mismatches}"


def test_the_rename_tables_name_only_options_that_exist():
    commands = typer.main.get_command(app).commands
    for command, (_, renames) in CASES.items():
        names = {option.name for option in commands[command].params}
        unknown = set(renames) - names
        assert not unknown, f"`phds {command}` has no options {sorted(unknown)}"
