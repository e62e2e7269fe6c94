"""``python -m gateway.cli``, as the tests and benchmarks start the gateway."""

from . import main

main()
