# moto_server with one request at a time.
#
# moto's server answers each request on its own thread, and its DynamoDB
# checks a write's condition and then writes, two steps with no lock
# between: two concurrent conditional writes of one item can both succeed
# (measured: eight racing `attribute_not_exists` puts had two winners in
# 2-3% of rounds on a loaded machine). A failed transaction restores a copy
# of the whole table taken before it, erasing the writes other requests
# made meanwhile. DynamoDB's conditional writes and transactions are
# atomic, and the mesh's claims, leases and workflow steps rely on it; so
# the tests' emulator handles requests one at a time (connections still on
# threads). Arguments are moto_server's.
import sys
import threading

from moto.moto_server import werkzeug_app
from moto.server import main

_lock = threading.Lock()
_call = werkzeug_app.DomainDispatcherApplication.__call__


def _one_at_a_time(self, environ, start_response):
    with _lock:
        answer = _call(self, environ, start_response)
        try:
            return list(answer)
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                close()


werkzeug_app.DomainDispatcherApplication.__call__ = _one_at_a_time
sys.argv[0] = "moto_server"
main()
