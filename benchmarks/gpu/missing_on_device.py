"""Print name==version for each package in a pip --report that the GPU image does not already hold.
have_packages.txt beside this file: the names of the packages the GPU machine already has (its `pip list`; replace it with your machine's)."""
import json, re, sys, pathlib
norm = lambda s: re.sub(r"[-_.]+", "-", s.strip().lower())
have = {norm(x) for x in (pathlib.Path(__file__).with_name("have_packages.txt").read_text().split(","))}
skip = re.compile(r"^(torch|triton|nvidia-|cuda-)")
for item in json.load(open(sys.argv[1]))["install"]:
    m = item["metadata"]; n = norm(m["name"])
    if n not in have and not skip.match(n):
        print(f"{m['name']}=={m['version']}")
