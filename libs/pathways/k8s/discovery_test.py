from kubernetes import client

from pathways.k8s import discovery


def _endpoints(ready, not_ready=(), port_name="grpc"):
    subset = client.V1EndpointSubset(
        addresses=[client.V1EndpointAddress(ip=ip) for ip in ready] or None,
        not_ready_addresses=[client.V1EndpointAddress(ip=ip) for ip in not_ready] or None,
        ports=[
            client.CoreV1EndpointPort(name=port_name, port=50051),
            client.CoreV1EndpointPort(name="metrics", port=9090),
        ],
    )
    return client.V1Endpoints(subsets=[subset])


def test_ready_addresses_only_on_the_grpc_port():
    eps = _endpoints(["10.0.0.9", "10.0.0.3"], not_ready=["10.0.0.5"])
    assert discovery.ready_addresses(eps) == ["10.0.0.3:50051", "10.0.0.9:50051"]
    assert discovery.ready_addresses(client.V1Endpoints(subsets=None)) == []
    assert discovery.ready_addresses(_endpoints(["10.0.0.1"], port_name="http")) == []


def test_static_source():
    src: discovery.ReplicaSource = discovery.StaticReplicaSource({"embed": ["h:1", "h:2"]})
    src.subscribe(lambda m, r: None)
    assert src.replicas("embed") == ["h:1", "h:2"]
    assert src.replicas("head") == []
