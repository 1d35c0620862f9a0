"""chunkfs vs JuiceFS side-by-side benchmark (not a test).

    python -m bench.run [--size 1GiB] [--small-files 5000] [--quick] [--out results.json]

``bench.run`` orchestrates (local services, formatting, mounts, table); ``bench.workloads``
holds the I/O workloads, run in child processes with plain POSIX calls, identical for both
filesystems; ``bench.targets`` adapts each filesystem (mount, unmount, peak RSS);
``bench.s3raw`` measures the raw S3 PUT/GET ceiling. See bench/README.md.
"""
