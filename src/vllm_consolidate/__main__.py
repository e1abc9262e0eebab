
from vllm_consolidate.cli import console_main

console_main()
