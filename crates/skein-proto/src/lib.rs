//! gRPC types and stubs generated from `proto/` at build time: the admin API
//! (`skein.admin.v1`), Raft between nodes (`skein.raft.v1`) and stored responses between nodes
//! (`skein.responses.v1`) and idempotency keys between nodes (`skein.idempotency.v1`).
//! Depends on nothing of Skein's own.

/// `skein.admin.v1`: the admin API of a node.
#[allow(clippy::unwrap_used, clippy::pedantic, missing_docs)]
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("skein.admin.v1");
    }
}

/// `skein.raft.v1`: Raft RPCs between nodes.
#[allow(clippy::unwrap_used, clippy::pedantic, missing_docs)]
pub mod raft {
    pub mod v1 {
        tonic::include_proto!("skein.raft.v1");
    }
}

/// `skein.responses.v1`: stored Responses API answers between nodes.
#[allow(clippy::unwrap_used, clippy::pedantic, missing_docs)]
pub mod responses {
    pub mod v1 {
        tonic::include_proto!("skein.responses.v1");
    }
}

/// `skein.idempotency.v1`: idempotency keys between nodes.
#[allow(clippy::unwrap_used, clippy::pedantic, missing_docs)]
pub mod idempotency {
    pub mod v1 {
        tonic::include_proto!("skein.idempotency.v1");
    }
}

/// Every service and message above, encoded as a `FileDescriptorSet`: what gRPC server
/// reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("skein_descriptor");
