"""What the core install (no extras) must be enough for: importing sknet_triton and training.

pandas and matplotlib come with the `perf` and `test` extras only; a subprocess in which they are missing
shows that neither the package nor a whole (tiny) training run needs them.
"""
import os
import subprocess
import sys
import textwrap

REPORT_ONLY = ("pandas", "matplotlib")

PROGRAM = textwrap.dedent(
    """
    import sys

    # As if not installed: importing them raises ImportError, and importlib.util.find_spec (which torch
    # uses to probe for optional packages) finds nothing.
    for name in {blocked}:
        sys.modules[name] = None
    import sknet_triton
    from sknet_triton import train

    status = train.main(sys.argv[1:])
    print("status", status, "loaded", sorted(name for name in {blocked} if sys.modules[name] is not None))
    """
).format(blocked=REPORT_ONLY)


def test_import_and_training_need_no_report_packages(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    arguments = ["--model", "sknet_tiny", "--data", "synthetic", "--img-size", "32", "--synthetic-size", "16",
                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--output", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-c", PROGRAM, *arguments], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "status 0 loaded []", result.stdout
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
