"""The ``tessera-cp`` command: ``tessera-cp info`` prints the backend, the GPU and the library versions."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tessera-cp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backend, device, compute capability, CuPy/CUDA versions")
    args = parser.parse_args(argv)
    if args.command == "info":
        import tessera_cp
        json.dump(tessera_cp.info(), sys.stdout, indent=2, default=str)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
