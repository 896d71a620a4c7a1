/*
 * ftvm built-in test guest: shared declarations.
 *
 * Freestanding: no libc and no system headers (the build passes -nostdinc);
 * the few types needed come from gcc's predefined macros.
 */
#ifndef FTVM_GUEST_H
#define FTVM_GUEST_H

typedef __UINT8_TYPE__ u8;
typedef __UINT16_TYPE__ u16;
typedef __UINT32_TYPE__ u32;
typedef __UINT64_TYPE__ u64;
typedef __SIZE_TYPE__ size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- ports of the ftvm machine ---------------------------------------- */
#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4

/* Exit statuses written to DEBUG_EXIT_PORT. */
#define EXIT_OK 0
#define EXIT_EXCEPTION 3
#define EXIT_BAD_VECTOR 4

/* Interrupt vectors: the PIC is programmed with bases 0x20 and 0x28. */
#define VEC_PIC1_BASE 0x20
#define VEC_PIC2_BASE 0x28
#define VEC_TIMER (VEC_PIC1_BASE + 0)
#define VEC_UART (VEC_PIC1_BASE + 4)
#define VEC_SPURIOUS_MASTER (VEC_PIC1_BASE + 7)
#define VEC_SPURIOUS_SLAVE (VEC_PIC2_BASE + 7)

/* ---- privileged instructions: only the ones the emulator supports ----- */
static inline void outb(u8 v, u16 port)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline void cli(void)
{
	__asm__ volatile("cli" : : : "memory");
}

static inline void sti(void)
{
	__asm__ volatile("sti" : : : "memory");
}

/*
 * Enable interrupts and halt as one step: the STI shadow keeps an interrupt
 * that is already pending from being taken before the HLT, so the wake-up
 * is never lost. Returns (with interrupts enabled) after one was handled.
 */
static inline void sti_hlt(void)
{
	__asm__ volatile("sti; hlt" : : : "memory");
}

static inline void cli_hlt(void)
{
	__asm__ volatile("cli; hlt" : : : "memory");
}

__attribute__((noreturn)) static inline void halt_forever(void)
{
	for (;;)
		cli_hlt();
}

/* ---- util.c ------------------------------------------------------------ */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* A bounded text line being formatted; appends past the end are dropped. */
#define LINE_CAP 320
struct line {
	u32 n;
	char b[LINE_CAP];
};
void line_reset(struct line *l);
void line_ch(struct line *l, char c);
void line_str(struct line *l, const char *s);
void line_mem(struct line *l, const char *s, u32 n);
/* Decimal, zero-padded to at least `width` digits. */
void line_dec(struct line *l, u64 v, u32 width);
/* Lowercase hex, exactly `digits` digits, or as few as needed if 0. */
void line_hex(struct line *l, u64 v, u32 digits);
/* A byte as the echo format shows it: printable ASCII as is, `"` and `\`
 * backslash-escaped, anything else as \xHH. */
void line_escaped(struct line *l, u8 c);

/* Running FNV-1a (32-bit) checksum. Callers keep interrupts off. */
void sum_init(void);
void sum_byte(u8 b);
/* Folds a value as its 8 bytes, little-endian. */
void sum_u64(u64 v);
u32 sum_get(void);

/* ---- uart.c ------------------------------------------------------------ */
void uart_init(u64 hz);
/* Interrupt handler body (interrupts off): services the UART until its
 * IIR reports nothing pending. */
void uart_service(void);
/* Queues bytes for interrupt-driven transmission; call with interrupts on.
 * Waits (sti; hlt) while the TX ring is full; never drops. */
void tx_write(const char *s, u32 n);
void tx_line(const struct line *l);
/* Waits (sti; hlt) until the TX ring is empty, then polls LSR.TEMT. */
void tx_drain(void);
/* Called from the main loop with interrupts off: true if transmission
 * looks stuck (a THRE interrupt lost) and tx_unstick() should run. */
bool tx_stalled(u64 now);
void tx_unstick(void);
/* Takes up to `max` received bytes (interrupts off). `*overruns` gets the
 * number of overruns (LSR.OE, bytes lost in the UART) since the last call. */
u32 rx_take(u8 *buf, u32 max, u64 *overruns);
bool rx_pending(void);
u64 rx_total(void);
/* Fatal path: polled output that does not depend on interrupts. */
void uart_poll_flush_ring(void);
void uart_poll_line(const struct line *l);
void uart_poll_wait_temt(void);

/* ---- pit.c ------------------------------------------------------------- */
extern volatile u64 ticks;
void pit_init(u64 hz);
void pit_irq(void);
/* Counter-latch command, then lo and hi byte of channel 0. */
u16 pit_read(void);
/* Read-back command latching count and status of channel 0. */
void pit_readback(u8 *status, u16 *count);

/* ---- pic.c ------------------------------------------------------------- */
void pic_init(void);
void pic_unmask_used(void);
void pic_eoi(u32 irq);
/* IRQ7 / IRQ15 vectors: EOI only if the ISR bit says the IRQ is real. */
void pic_spurious(u32 irq);

/* ---- cmos.c ------------------------------------------------------------ */
struct rtc_time {
	u32 year, month, day, hour, minute, second;
};
void rtc_read(struct rtc_time *t);

/* ---- idt.c ------------------------------------------------------------- */
struct isr_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};
void idt_init(void);
void isr_dispatch(struct isr_frame *f);

/* ---- spin.c ------------------------------------------------------------ */
/* Prints `[spin] cpl=C start target=N kib=K`, drains the output, spins at
 * CPL `cpl` (0 or 3) until N more ticks were counted, prints
 * `[spin] cpl=C ticks=T iters=I sum=XXXXXXXX`. Interrupts on. `kib` is a
 * power of two, at most spin_buf_max_kib(). */
void spin_run(u32 cpl, u64 n, u64 kib);
/* KiB of guest memory available for the spin buffer. */
u64 spin_buf_max_kib(u64 mem_bytes);
/* #UD handler: true if this is the planned CPL3 exit (the frame now
 * returns to the kernel after user_call). */
bool spin_user_exit(struct isr_frame *f);

/* ---- main.c ------------------------------------------------------------ */
void kmain(const char *cmdline, u64 mem_bytes);

#endif
