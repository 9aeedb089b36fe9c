"""Endpoint discovery: servers advertise endpoints in get_flight_info; clients and jobs use them."""
from __future__ import annotations

import argparse

import pyarrow.flight as fl
import pytest

from flight_client import EmbeddingClient
from flight_client.embed_cli import add_parsers, discover_servers
from flight_server.config import ServerConfig
from flight_server.servicer import EmbeddingServer


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    import engine

    return engine.load_model(tiny_clip_dir)


def test_default_endpoint_is_the_bound_address(clip):
    with EmbeddingServer({"tiny": clip}, ServerConfig(port=0)) as server:
        uri = f"grpc://127.0.0.1:{server.port}"
        info = fl.connect(uri).get_flight_info(fl.FlightDescriptor.for_path("tiny"))
        locations = [loc.uri.decode() for ep in info.endpoints for loc in ep.locations]
        assert len(locations) == 1 and locations[0].endswith(f"127.0.0.1:{server.port}")
        with EmbeddingClient(uri) as client:
            assert client.endpoints() == [f"grpc+tcp://127.0.0.1:{server.port}"]


def test_advertised_peers_are_discovered_and_deduplicated(clip):
    with EmbeddingServer({"tiny": clip}, ServerConfig(port=0)) as b:
        peer = f"grpc+tcp://127.0.0.1:{b.port}"
        with EmbeddingServer({"tiny": clip}, ServerConfig(port=0, advertise=(peer, "grpc+tcp://10.9.9.9:1"))) as a:
            first = f"grpc+tcp://127.0.0.1:{a.port}"
            found = discover_servers((first, first), "tiny", None, None)
            assert found == (first, peer, "grpc+tcp://10.9.9.9:1")
            # grpc:// as a user types it and the grpc+tcp:// a server advertises are one server, used once
            given = f"grpc://127.0.0.1:{b.port}"  # b advertises its bound address, grpc+tcp://127.0.0.1:port
            assert discover_servers((given,), "tiny", None, None) == (given,)


def test_wildcard_bind_advertises_nothing_unless_told(clip):
    with EmbeddingServer({"tiny": clip}, ServerConfig(host="0.0.0.0", port=0, insecure=True)) as server:
        assert server.advertised_locations() == []


def test_embed_cli_has_discover_flag():
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["embed", "in", "out", "--kind", "text", "--server", "grpc://x:1", "--discover"])
    assert args.discover is True
