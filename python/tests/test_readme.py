"""The original zrpc README's server and client, copied verbatim, against zrpcd."""

import re

from conftest import wait_registered

# Verbatim from the original README ("Example server").
README_SERVER = '''\
from zrpc.server import Server, rpc_method

class TestServer(Server):
    @rpc_method
    def func(self, payload):
        print('RPC request [%s]: %s' % (self.counter, payload))
        return 'func', payload

TestServer(name='test_server').run()
'''

# Verbatim from the original README ("Example client"). The snippet prints an
# undefined name, `timestamp`; the test defines it (PRELUDE) before running
# the snippet unchanged.
README_CLIENT = '''\
from zrpc.client import Client

client = Client()
response = client.call(service='test_server',
                       method='func',
                       payload={'haha': 'brt'})
print('RPC response [%s]: %s' % (timestamp, response))
'''
PRELUDE = "import time\ntimestamp = time.time()\n"


def test_readme_server_and_client_verbatim(broker, procs):
    server = procs.python(README_SERVER)
    wait_registered(broker.socket_dir, "test_server")
    client = procs.python(PRELUDE + README_CLIENT)
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    assert re.fullmatch(r"RPC response \[[0-9.]+\]: \['func', \{'haha': 'brt'\}\]", out.strip()), out
    # The server printed the request with its counter (1: the first request).
    server.kill()
    sout, _ = server.communicate(timeout=10)
    assert "RPC request [1]: {'haha': 'brt'}" in sout


def test_readme_client_calls_rust_test_server(broker, procs):
    """The README client against the Rust test_server: the tuple arrives as a list."""
    from conftest import rust_bin
    procs.spawn([rust_bin("test_server")])
    wait_registered(broker.socket_dir, "test_server")
    client = procs.python(PRELUDE + README_CLIENT)
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    assert "['func', {'haha': 'brt'}]" in out, out


def test_rust_test_client_calls_python_service(broker, procs):
    """The Rust test_client (typed: (String, Value)) calls the README's Python server."""
    from conftest import rust_bin
    procs.python(README_SERVER)
    wait_registered(broker.socket_dir, "test_server")
    client = procs.spawn([rust_bin("test_client")])
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    assert '("func", {"haha": "brt"})' in out, out
