import sys

from vllm_consolidate.cli import main

sys.exit(main())
