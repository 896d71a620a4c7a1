//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine through it and to find no keyboard behind it.
//!
//! The range also covers ports 0x61-0x63. Port 0x61 (speaker gate, NMI
//! status) reads 0 here: on real hardware its refresh bit toggles with
//! time, and a value that depends on when the guest looks would need
//! recording for no benefit.

use std::fmt;

use super::{BusDevice, DeviceError, StopRequest, StopSignal};

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
/// Last write went to the command port rather than the data port.
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited by the (absent) key lock.
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
/// What firmware leaves behind: keyboard interrupt enabled, POST passed.
const CTR_DEFAULT: u8 = 0x01 | CTR_SYS;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_WRITE_OUTPUT: u8 = 0xd1;

const SELF_TEST_OK: u8 = 0x55;
/// Output port bit wired to the CPU's reset line (active low).
const OUTPUT_RESET_N: u8 = 0x01;

pub struct I8042 {
    stop: StopSignal,
    ctr: u8,
    /// The byte the guest will read from the data port next.
    out: Option<u8>,
    /// Command whose parameter the next data-port write supplies.
    pending: Option<u8>,
    last_was_command: bool,
}

impl I8042 {
    pub fn new(stop: StopSignal) -> Self {
        Self {
            stop,
            ctr: CTR_DEFAULT,
            out: None,
            pending: None,
            last_was_command: true,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED | (self.ctr & CTR_SYS);
        if self.last_was_command {
            s |= STATUS_CMD;
        }
        if self.out.is_some() {
            s |= STATUS_OBF;
        }
        debug_assert_eq!(CTR_SYS, STATUS_SYS);
        s
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.out = Some(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT => self.pending = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_SELF_TEST => {
                self.ctr |= CTR_SYS;
                self.out = Some(SELF_TEST_OK);
            }
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            // Pulse output port lines for ~6us: a 0 in bit 0 of the mask
            // pulses the reset line. 0xfe is the classic reboot.
            0xf0..=0xff if cmd & OUTPUT_RESET_N == 0 => self.stop.request(StopRequest::Reset),
            _ => {}
        }
    }

    fn data_write(&mut self, v: u8) {
        self.last_was_command = false;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = v,
            Some(CMD_WRITE_OUTPUT) if v & OUTPUT_RESET_N == 0 => {
                self.stop.request(StopRequest::Reset)
            }
            // Otherwise the byte is for the keyboard, and there is none.
            _ => {}
        }
    }
}

/// The controller, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct I8042State {
    /// Controller configuration byte.
    pub ctr: u8,
    /// The byte the guest reads from the data port next.
    pub out: Option<u8>,
    /// The command (0x60 or 0xd1) whose parameter the next data write is.
    pub pending: Option<u8>,
    pub last_was_command: bool,
}

impl I8042State {
    /// Refuses values no controller can hold.
    pub fn check(&self) -> Result<(), DeviceError> {
        match self.pending {
            Some(p) if p != CMD_WRITE_CTR && p != CMD_WRITE_OUTPUT => {
                Err(DeviceError::bad("i8042", format!("pending command {p:#04x} takes no parameter")))
            }
            _ => Ok(()),
        }
    }
}

impl I8042 {
    /// Everything that decides the controller's future behaviour (its
    /// stop signal is wiring, not state).
    pub fn state(&self) -> I8042State {
        // Exhaustive: a new field of `I8042` must be added to the state.
        let I8042 { stop: _, ctr, out, pending, last_was_command } = *self;
        I8042State { ctr, out, pending, last_was_command }
    }

    /// A controller in state `s` that asks `stop` for resets.
    pub fn from_state(s: &I8042State, stop: StopSignal) -> Result<I8042, DeviceError> {
        let mut d = I8042::new(stop);
        d.restore(s)?;
        Ok(d)
    }

    /// Puts this controller in state `s`; unchanged if `s` is refused.
    pub fn restore(&mut self, s: &I8042State) -> Result<(), DeviceError> {
        s.check()?;
        (self.ctr, self.out, self.pending, self.last_was_command) = (s.ctr, s.out, s.pending, s.last_was_command);
        Ok(())
    }
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("ctr", &self.ctr)
            .field("out", &self.out)
            .field("pending", &self.pending)
            .field("last_was_command", &self.last_was_command)
            .finish_non_exhaustive()
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        data.fill(0);
        data[0] = match offset {
            DATA => self.out.take().unwrap_or(0),
            COMMAND => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            DATA => self.data_write(v),
            COMMAND => self.command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_support::rd;

    fn dev() -> (I8042, StopSignal) {
        let stop = StopSignal::new();
        (I8042::new(stop.clone()), stop)
    }

    #[test]
    fn idle_status() {
        let (mut d, stop) = dev();
        assert_eq!(rd(&mut d, COMMAND), 0x1c);
        assert_eq!(rd(&mut d, DATA), 0);
        assert_eq!(stop.get(), None);
    }

    #[test]
    fn reset_via_fe() {
        let (mut d, stop) = dev();
        d.write(COMMAND, &[0xfe]);
        assert_eq!(stop.get(), Some(StopRequest::Reset));
    }

    #[test]
    fn pulse_without_reset_bit_is_harmless() {
        let (mut d, stop) = dev();
        d.write(COMMAND, &[0xff]);
        d.write(COMMAND, &[0xf1]);
        assert_eq!(stop.get(), None);
        d.write(COMMAND, &[0xf0]);
        assert_eq!(stop.get(), Some(StopRequest::Reset));
    }

    #[test]
    fn reset_via_output_port() {
        let (mut d, stop) = dev();
        d.write(COMMAND, &[CMD_WRITE_OUTPUT]);
        d.write(DATA, &[0x03]);
        assert_eq!(stop.get(), None);
        d.write(COMMAND, &[CMD_WRITE_OUTPUT]);
        d.write(DATA, &[0x02]);
        assert_eq!(stop.get(), Some(StopRequest::Reset));
    }

    #[test]
    fn command_byte_round_trip() {
        let (mut d, _) = dev();
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, COMMAND) & STATUS_OBF, STATUS_OBF);
        assert_eq!(rd(&mut d, DATA), CTR_DEFAULT);
        assert_eq!(rd(&mut d, COMMAND) & STATUS_OBF, 0);
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x61]);
        assert_eq!(rd(&mut d, COMMAND), STATUS_UNLOCKED);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, DATA), 0x61);
        // A stray data write is for the keyboard and changes nothing.
        d.write(DATA, &[0x00]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, DATA), 0x61);
    }

    #[test]
    fn self_test_and_port_enables() {
        let (mut d, _) = dev();
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x00]);
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(rd(&mut d, DATA), SELF_TEST_OK);
        assert_eq!(rd(&mut d, COMMAND) & STATUS_SYS, STATUS_SYS);
        d.write(COMMAND, &[CMD_KBD_DISABLE]);
        d.write(COMMAND, &[CMD_AUX_DISABLE]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(
            rd(&mut d, DATA),
            CTR_SYS | CTR_KBD_DISABLE | CTR_AUX_DISABLE
        );
        d.write(COMMAND, &[CMD_KBD_ENABLE]);
        d.write(COMMAND, &[CMD_AUX_ENABLE]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, DATA), CTR_SYS);
    }

    #[test]
    fn new_command_cancels_pending_parameter() {
        let (mut d, stop) = dev();
        d.write(COMMAND, &[CMD_WRITE_OUTPUT]);
        d.write(COMMAND, &[0x12]);
        d.write(DATA, &[0x00]);
        assert_eq!(stop.get(), None);
    }

    /// A copy built from `state()` answers and resets as the original: an
    /// unread byte, a command waiting for its parameter.
    #[test]
    fn state_round_trip_behaves_identically() {
        let (mut d, stop) = dev();
        d.write(COMMAND, &[CMD_KBD_DISABLE]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        d.write(COMMAND, &[CMD_WRITE_OUTPUT]);
        let s = d.state();
        assert_eq!(s.pending, Some(CMD_WRITE_OUTPUT));
        let stop2 = StopSignal::new();
        let mut e = I8042::from_state(&s, stop2.clone()).unwrap();
        assert_eq!(e.state(), s);
        let drive = |d: &mut I8042| {
            let seen = [rd(d, COMMAND), rd(d, DATA), rd(d, COMMAND)];
            d.write(DATA, &[0x00]);
            seen
        };
        assert_eq!(drive(&mut d), drive(&mut e));
        assert_eq!(stop.get(), Some(StopRequest::Reset));
        assert_eq!(stop2.get(), stop.get());
        let mut bad = s;
        bad.pending = Some(0x12);
        assert!(e.restore(&bad).is_err());
    }

    #[test]
    fn other_ports_read_zero() {
        let (mut d, _) = dev();
        for off in 1..=3 {
            let mut b = [0xff; 2];
            d.read(off, &mut b);
            assert_eq!(b, [0, 0]);
            d.write(off, &[0xff]);
        }
        d.write(COMMAND, &[CMD_SELF_TEST, 0xff]);
        let mut b = [0xff; 4];
        d.read(DATA, &mut b);
        assert_eq!(b, [SELF_TEST_OK, 0, 0, 0]);
        d.write(DATA, &[]);
        d.read(DATA, &mut []);
        assert_eq!(rd(&mut d, 9), 0);
    }
}
