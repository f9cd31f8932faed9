//! openraft's storage compliance suite against the sled log store and state machine.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use skein_control::machine::StateMachine;
use skein_control::store::LogStore;
use skein_control::{NodeId, TypeConfig};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let db = sled::Config::new()
            .path(dir.path())
            .open()
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        let log = LogStore::open(&db).map_err(|e| openraft::StorageIOError::write(&e))?;
        let history = skein_control::History::open(&db, 400)
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        let machine = StateMachine::open(
            &db,
            dir.path().join("snapshots"),
            std::sync::Arc::new(history),
        )?;
        Ok((dir, log, machine))
    }
}

#[test]
fn the_sled_store_passes_the_openraft_storage_suite() {
    if let Err(error) = Suite::test_all(SledBuilder) {
        panic!("storage suite failed: {error}");
    }
}
