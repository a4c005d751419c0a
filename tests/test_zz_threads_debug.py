import threading, multiprocessing
def test_threads():
    print("\nTHREADS:", [(t.name, t.daemon) for t in threading.enumerate()])
    print("CHILDREN:", multiprocessing.active_children())
