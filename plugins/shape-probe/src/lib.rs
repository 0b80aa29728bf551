//! A component of another world: see `wit/probe.wit`.

wit_bindgen::generate!({
    path: "wit",
    world: "probe",
});

struct Probe;

fn value(row: u32, col: u32) -> f32 {
    (row * 31 + col) as f32 * 0.001
}

impl Guest for Probe {
    // Both shapes are built the same way (exact capacity, plain loops), so
    // the difference a benchmark sees is the cost of lifting them.
    fn flat(rows: u32, dim: u32) -> Vec<f32> {
        let mut out = Vec::with_capacity((rows * dim) as usize);
        for r in 0..rows {
            for c in 0..dim {
                out.push(value(r, c));
            }
        }
        out
    }

    fn nested(rows: u32, dim: u32) -> Vec<Vec<f32>> {
        let mut out = Vec::with_capacity(rows as usize);
        for r in 0..rows {
            let mut row = Vec::with_capacity(dim as usize);
            for c in 0..dim {
                row.push(value(r, c));
            }
            out.push(row);
        }
        out
    }
}

export!(Probe);
