from batchprobe.cli import main

# Guarded: multiprocessing's forkserver re-imports the main module (as __mp_main__) in children.
if __name__ == "__main__":
    main()
