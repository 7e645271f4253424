"""Start-up: a command imports what it uses and nothing else (no timings here, only which modules load).

`sdlab generate` on the bundled model is meant to finish in about two seconds from a cold process, and
most of that is importing: torch alone takes about one. These tests keep out of a run the modules it
does not need, so that the cost cannot creep back unseen (docs/performance-startup.md has the timings).
"""

import json
import subprocess
import sys

import pytest
from torch import nn

from sdlab.cli import COMMAND_MODULES, build_parser
from sdlab.models import build_unet
from sdlab.models.empty import empty_modules
from sdlab.bundled import DEMO

# never needed to make an image from the command line
NOT_FOR_GENERATE = ("fastapi", "uvicorn", "starlette", "matplotlib", "sklearn", "scipy", "sympy",
                    "torch._dynamo", "torch._inductor", "sdlab.server", "sdlab.training", "sdlab.shapes",
                    "sdlab.digits")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_parsing_a_generate_command_loads_neither_torch_nor_other_commands():
    loaded = modules_after("import sdlab.cli; sdlab.cli.build_parser('generate').parse_args(['generate', 'a cat'])")
    unwanted = {"torch", "numpy", *NOT_FOR_GENERATE, "sdlab.cli.train", "sdlab.cli.serve", "sdlab.cli.digits"}
    assert not unwanted & loaded


@pytest.mark.parametrize("command", ["samplers", "tokenize"])
def test_commands_that_need_no_model_start_without_torch(command):
    loaded = modules_after(f"import sdlab.cli; sdlab.cli.build_parser({command!r})")
    assert "torch" not in loaded


def test_generate_on_the_bundled_model_imports_only_what_it_uses(tmp_path):
    out = tmp_path / "circle.png"
    loaded = modules_after("from sdlab.cli import main\n"
                           f"assert main(['generate', 'a red circle', '--steps', '1', '--quiet', '-o', {str(out)!r}]) == 0")
    assert out.is_file()
    assert not {name for name in loaded if name.split(".")[0] in NOT_FOR_GENERATE or
                name.startswith(tuple(f"{m}." for m in NOT_FOR_GENERATE)) or name in NOT_FOR_GENERATE}


def test_the_command_table_names_every_command_its_modules_register():
    full = build_parser()
    registered = set(next(a for a in full._actions if a.dest == "command").choices)
    assert registered == {name for _, _, names in COMMAND_MODULES for name in names}
    for _, _, names in COMMAND_MODULES:
        for name in names:  # a command alone gets its own full parser
            alone = build_parser(name)
            assert name in next(a for a in alone._actions if a.dest == "command").choices


def test_an_unknown_command_still_lists_every_choice(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("paint").parse_args(["paint"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "'generate'" in error and "'train'" in error and "'serve'" in error


def test_empty_modules_allocate_nothing_and_restore_the_initialisers():
    normal = nn.init.normal_
    with empty_modules():
        unet = build_unet(DEMO.unet)
    assert all(p.is_meta for p in unet.parameters())
    assert nn.init.normal_ is normal
    assert nn.Linear(2, 2).weight.abs().sum() > 0  # initialisers work again outside
