"""vqx: quantize a Wan2.1 pipeline, export it for lightx2v, score it. `python run.py --help` lists the groups.

The same command line as `vqx run` (vqx.entry), for a checkout."""

from vqx.entry import run_command_line

if __name__ == "__main__":
    run_command_line()
