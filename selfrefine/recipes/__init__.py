"""The four command-line programs as functions: `main(argv)` of each module; the top-level scripts are thin fronts."""
