"""The command line as a person meets it: --version, --help and usage errors without TensorFlow,
unknown flags named with the closest known one."""
import subprocess
import sys

from toolchain import __version__
from toolchain.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"toolchain {__version__}"


def test_unknown_flag_is_named_with_a_suggestion(capsys):
    assert main(["compress", "--modle", "m.keras", "--data", "digits", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: toolchain compress: unknown option --modle; did you mean --model? "
                   "(see `toolchain compress --help`)"]


def test_help_and_usage_errors_do_not_import_tensorflow():
    code = ("import sys\nfrom toolchain.cli import main\n"
            "for argv in (['--help'], ['compress', '--help'], ['compress', '--out', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
