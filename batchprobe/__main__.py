from batchprobe.cli import main

main()
