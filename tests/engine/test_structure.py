"""The shape the code promises (issue #21): short functions in engine/, one error base class,
one exit-code convention in every verb's --help."""
import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import medseg_dpl
from medseg_dpl.errors import EXIT_CODES_HELP, MedsegError

PKG = Path(medseg_dpl.__file__).parent


def test_no_function_in_engine_is_over_60_lines():
    long = []
    for f in sorted((PKG / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{f.name}:{node.name} ({n} lines)")
    assert not long, long


def test_every_error_class_derives_from_the_one_base():
    found, stray = [], []
    for mod in pkgutil.walk_packages([str(PKG)], "medseg_dpl."):
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and obj.__module__ == module.__name__ and name.endswith("Error")
                    and issubclass(obj, Exception)):
                found.append(name)
                if not issubclass(obj, MedsegError):
                    stray.append(f"{mod.name}.{name}")
    assert len(found) >= 14 and not stray, stray


def test_every_verb_documents_the_exit_codes():
    from medseg_dpl.cli import build_parser

    parser = build_parser()
    assert EXIT_CODES_HELP in parser.format_help().replace("\n", " ") or "exit codes" in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert len(sub.choices) >= 10
    for name, verb in sub.choices.items():
        assert EXIT_CODES_HELP in verb.epilog, name


def test_a_library_error_a_verb_does_not_catch_exits_1(tmp_path, capsys):
    from medseg_dpl.cli import main

    # postprocess on a folder that is no run: PostprocessError -> "error: ..." and 1
    assert main(["postprocess", "--run", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err
