//! Guest physical memory layout and the port map, in one place.

/// GDT built by the VMM for the 64-bit entry: null, code (0x08), data (0x10).
pub const GDT_ADDR: u64 = 0x500;
/// Selector of the 64-bit code segment in that GDT.
pub const CODE_SEL: u16 = 0x08;
/// Selector of the data segment in that GDT.
pub const DATA_SEL: u16 = 0x10;
/// Empty IDT installed at entry, so an early fault triple-faults (a clean
/// `Shutdown` exit) instead of running through garbage.
pub const IDT_ADDR: u64 = 0x520;
/// Zero page (Linux `boot_params`) for bzImage guests.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// PML4 of the identity map built for the entry.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory; 4 of them (0xb000..0xf000) map 4 GiB with 2 MiB pages.
pub const PD_ADDR: u64 = 0xb000;
/// How many page directories follow `PD_ADDR` (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;
/// Command line handed to the guest (pointer in RDI for ELF guests).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Initial stack pointer for ELF guests (they may set their own).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Start of high memory; ELF guests and the Linux kernel load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the legacy hole (VGA, ROMs) kept out of the e820 RAM map.
pub const EBDA_START: u64 = 0x9fc00;

/// COM1 16550 UART.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u8 = 4;
/// Master 8259A PIC (command, data).
pub const PIC_MASTER_BASE: u16 = 0x20;
/// Slave 8259A PIC (command, data).
pub const PIC_SLAVE_BASE: u16 = 0xa0;
/// 8254 PIT channels 0-2 and its mode/command register.
pub const PIT_BASE: u16 = 0x40;
/// PIT channel 0 drives this ISA line.
pub const PIT_IRQ: u8 = 0;
/// CMOS/RTC index and data ports.
pub const CMOS_BASE: u16 = 0x70;
/// i8042 keyboard controller: data port 0x60, command/status port 0x64.
pub const I8042_BASE: u16 = 0x60;
/// QEMU-compatible debug exit port: a byte written here ends the VM with it
/// as status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// PIT input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;
