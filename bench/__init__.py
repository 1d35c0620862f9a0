"""chunkfs vs JuiceFS side-by-side benchmark (not a test).

    python -m bench.run [--quick] [--workloads apps,durable] [--out results.json]

``bench.run`` orchestrates (local services, formatting, mounts, rounds); ``bench.plan``
names the workloads, their sizes and the table's rows and targets; ``bench.report`` turns
results into tables (pure functions); ``bench.workloads`` (streaming, small files,
metadata) and ``bench.apps`` (git, tar, SQLite, durable appends, page overwrites) are the
workloads, run in child processes, identical for both filesystems; ``bench.targets``
adapts each filesystem (mount, unmount, peak RSS); ``bench.s3proxy`` counts each one's
S3 requests and bytes; ``bench.s3raw`` measures the raw S3 PUT/GET ceiling. See
bench/README.md.
"""
