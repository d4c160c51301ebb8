"""Wire format shared by the Kafka and gRPC adapters: generated protobuf code and codecs.

``streaming`` and ``rpc`` both depend on this package and never on each other.
"""
