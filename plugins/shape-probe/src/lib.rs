//! A component of another world: see `wit/probe.wit`.

wit_bindgen::generate!({
    path: "wit",
    world: "probe",
});

struct Probe;

/// The largest batch the benchmark asks for.
const MAX_ROWS: u32 = 256;
const MAX_DIM: u32 = 384;

/// The floats, computed once: each call then only copies them into the
/// shape it returns, so what a benchmark sees is the cost of that shape
/// (building it, then the host lifting it), not of computing the values.
fn table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..MAX_ROWS * MAX_DIM).map(|i| i as f32 * 0.001).collect())
}

impl Guest for Probe {
    fn flat(rows: u32, dim: u32) -> Vec<f32> {
        let (rows, dim) = (rows.min(MAX_ROWS), dim.min(MAX_DIM));
        let mut out = Vec::with_capacity((rows * dim) as usize);
        for r in 0..rows {
            let start = (r * MAX_DIM) as usize;
            out.extend_from_slice(&table()[start..start + dim as usize]);
        }
        out
    }

    fn nested(rows: u32, dim: u32) -> Vec<Vec<f32>> {
        let (rows, dim) = (rows.min(MAX_ROWS), dim.min(MAX_DIM));
        (0..rows)
            .map(|r| {
                let start = (r * MAX_DIM) as usize;
                table()[start..start + dim as usize].to_vec()
            })
            .collect()
    }
}

export!(Probe);
