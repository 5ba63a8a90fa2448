#!/usr/bin/env python3
"""Peak memory of a `pde agent` under 16 parallel 16 MiB unsigned deploy bodies.

Usage: python3 scripts/agent-flood.py PATH-TO-pde  (prints JSON: peak RSS in MiB,
the status codes the requests got). See BENCHMARKS.md, "Agent under a flood".
"""
import sys, subprocess, threading, urllib.request, tempfile, os, json
binary = sys.argv[1]
d = tempfile.mkdtemp()
subprocess.run([binary, "keygen", "--out", d, "--name", "k"], check=True, capture_output=True)
p = subprocess.Popen([binary, "agent", "--listen", "127.0.0.1:0", "--data-dir", d + "/data", "--trusted-key", d + "/k.pub"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
line = p.stdout.readline().decode().strip()
addr = line.split("listening on ")[1]
head = '{"env":"prod","bundle":{"format":"pde.bundle/v1","digest":"sha256:' + "0"*64 + '","signatures":[],"payload":{"manifest":{},"policy":{"rules":['
tail = '{}]}}}}'
room = (16 << 20) - 1024 - len(head) - len(tail)
body = (head + '{"k":1},' * (room // 8) + tail).encode()
codes = []
def send(i):
    req = urllib.request.Request(f"http://{addr}/deploy", data=body, method="POST", headers={"Content-Type": "application/json", "Idempotency-Key": f"flood-{i}"})
    try:
        urllib.request.urlopen(req, timeout=600)
        codes.append(200)
    except urllib.error.HTTPError as e:
        codes.append(e.code)
    except Exception as e:
        codes.append(str(e))
ts = [threading.Thread(target=send, args=(i,)) for i in range(16)]
[t.start() for t in ts]; [t.join() for t in ts]
st = open(f"/proc/{p.pid}/status").read(); hwm = ([l for l in st.splitlines() if l.startswith("VmHWM")] or ["VmHWM: -1 kB"])[0].split()[1]
p.kill()
print(json.dumps({"exited": p.poll(), "binary": binary, "peak_rss_mib": int(hwm)//1024, "codes": sorted(set(map(str,codes)))}))
