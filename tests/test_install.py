"""What each install must be enough for: the core install (no extras) for importing sknet_triton, and the
`train` extra (timm, torchvision) for training.

pandas and matplotlib come with the `perf` and `test` extras only, and timm with `train`, `perf` and
`test`; subprocesses in which they are missing show that the package needs none of them, that a whole
(tiny) training run needs no report package, and that without timm the trainer says what to install.
"""
import os
import subprocess
import sys
import textwrap

REPORT_ONLY = ("pandas", "matplotlib")
TRAIN_EXTRA = ("timm",)

PROGRAM = textwrap.dedent(
    """
    import sys

    blocked = sys.argv[1].split(",")
    # As if not installed: importing them raises ImportError, and importlib.util.find_spec (which torch
    # uses to probe for optional packages) finds nothing.
    for name in blocked:
        sys.modules[name] = None
    import sknet_triton
    from sknet_triton import train

    status = train.main(sys.argv[2:])
    print("status", status, "loaded", sorted(name for name in blocked if sys.modules[name] is not None))
    """
)

ARGUMENTS = ("--model", "sknet_tiny", "--data", "synthetic", "--img-size", "32", "--synthetic-size", "16",
             "--epochs", "1", "--batch-size", "8", "--workers", "0")


def run_without(blocked, output):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", PROGRAM, ",".join(blocked), *ARGUMENTS, "--output", str(output)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_import_and_training_need_no_report_packages(tmp_path):
    result = run_without(REPORT_ONLY, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "status 0 loaded []", result.stdout
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_training_without_its_extra_says_what_to_install(tmp_path):
    result = run_without(REPORT_ONLY + TRAIN_EXTRA, tmp_path / "run")
    assert result.returncode == 0, result.stderr  # the program's own status; the trainer's is printed
    assert result.stdout.strip().splitlines()[-1] == "status 2 loaded []", result.stdout
    assert result.stderr.strip() == "sknet_triton.train: error: the trainer needs timm: pip install 'sknet_triton[train]'"
    assert not (tmp_path / "run").exists()
