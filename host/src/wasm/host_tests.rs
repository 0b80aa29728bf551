//! Unit tests of `host.rs`.

use super::*;

/// What the code run in `f` logs, at every level.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(lock(&captured.0).clone()).unwrap()
}

#[test]
fn a_plugins_output_is_logged_line_by_line_and_its_last_partial_line_at_its_end() {
    let gate = LogGate::new(Arc::from("test:output-lines"));
    let stream = LogStream {
        log: Arc::new(Mutex::new(gate)),
        stream: "stdout",
    };
    assert!(!stream.is_terminal());
    let text = logged(|| {
        let mut out = stream.p2_stream();
        out.write(Bytes::from_static(b"first line\nsecond, cut sh"))
            .unwrap();
        out.write(Bytes::from_static(b"ort")).unwrap();
        drop(out);
    });
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("first line") && lines[0].contains("stream=\"stdout\""),
        "{text}"
    );
    assert!(lines[1].contains("second, cut short"), "{text}");
}

#[tokio::test]
async fn the_wasip3_stream_is_a_sink_that_logs_nothing() {
    use tokio::io::AsyncWriteExt;
    let stream = LogStream {
        log: Arc::new(Mutex::new(LogGate::new(Arc::from("test:p3-sink")))),
        stream: "stderr",
    };
    let mut sink = std::pin::Pin::from(stream.async_stream());
    sink.write_all(b"never logged\n").await.unwrap();
    sink.flush().await.unwrap();
    assert_eq!(lock(&stream.log).dropped_total, 0);
}

#[test]
fn a_trace_line_of_host_log_is_logged_at_trace() {
    let mut state = HostState::new(Arc::from("test:trace-level"), 1 << 20, None).unwrap();
    let text = logged(|| {
        host_log::Host::log(&mut state, Level::Trace, "a trace line".into());
    });
    assert!(
        text.contains("TRACE") && text.contains("a trace line"),
        "{text}"
    );
}

#[test]
fn tables_past_their_element_count_are_refused_without_a_trap() {
    let mut cap = MemoryCap {
        limit: u64::MAX,
        used: 0,
        table_elements: 0,
        hit: None,
    };
    assert!(
        !cap.table_growing(0, limits::MAX_TABLE_ELEMENTS + 1, None)
            .unwrap()
    );
    assert_eq!((cap.used, cap.table_elements, cap.hit), (0, 0, None));
    assert!(cap.table_growing(0, 10, None).unwrap());
    assert_eq!(cap.used, 10 * limits::TABLE_ELEMENT_BYTES);
}

#[test]
fn a_model_directory_of_too_many_entries_is_refused_naming_it_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..=limits::MAX_SNAPSHOT_MODEL_FILES {
        std::fs::write(dir.path().join(i.to_string()), "").unwrap();
    }
    let err = refuse_special_files(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(&*dir.path().to_string_lossy()) && err.contains("MAX_SNAPSHOT_MODEL_FILES"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("0")).unwrap();
    refuse_special_files(dir.path()).unwrap();
}

#[test]
fn bytes_past_the_plugins_budget_are_dropped_and_counted_in_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let plugin: Arc<str> = Arc::from("test:dropped-bytes-metric");
    metrics::with_local_recorder(&recorder, || {
        // Two gates of one plugin, as two instances (or a restart): the
        // second starts with what the first left.
        let line = "x".repeat(4000);
        for _ in 0..2 {
            let mut gate = LogGate::new(plugin.clone());
            for _ in 0..100 {
                gate.emit(tracing::Level::INFO, "host-log", &line);
            }
        }
    });
    let dropped = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| {
            let key = key.key();
            (key.name() == super::super::log_budget::METRIC_LOG_DROPPED_BYTES
                && key.labels().any(|l| l.value() == &*plugin))
            .then_some(value)
        });
    let Some(DebugValue::Counter(bytes)) = dropped else {
        panic!(
            "no {} counter: {dropped:?}",
            super::super::log_budget::METRIC_LOG_DROPPED_BYTES
        );
    };
    // 200 lines of about 4 KB asked for, a burst of 256 KiB allowed (the
    // per-instance line bucket alone would have let all 200 through).
    let asked = 200 * (4000 + plugin.len() + super::super::log_budget::LINE_OVERHEAD) as u64;
    assert!(
        bytes >= asked - limits::PLUGIN_LOG_BYTES_BURST - 8192,
        "{bytes} of {asked}"
    );
}
