/* Read a task's biases from a bias bank through the generated bank.h: what firmware on fixed-weight hardware
 * does before it loads a task's biases into the accelerator. No Python, no JSON parser: the header is the map.
 *
 *   gcc -std=c99 -O2 -I BANK_DIR examples/bank_reader.c -o bank_reader
 *   ./bank_reader BANK_DIR/bank.bin TASK_ID     (TASK_ID: a number, or a BITFIT_TASK_* from bank.h)
 *
 * Prints one line per bias: its name, its length and its float32 values (%.9g, exact for a float32).
 * Exit 2 on bad input (no such task, a bank.bin that is not the one bank.h describes). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bank.h"

static int host_is_little_endian(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BANK.bin TASK_ID (0..%d)\n", argv[0], BITFIT_BANK_NUM_TASKS - 1);
        return 2;
    }
    char *end = NULL;
    long task = strtol(argv[2], &end, 10);
    if (*argv[2] == '\0' || *end != '\0' || task < 0 || task >= BITFIT_BANK_NUM_TASKS) {
        fprintf(stderr, "task id %s: the bank holds tasks 0..%d\n", argv[2], BITFIT_BANK_NUM_TASKS - 1);
        return 2;
    }
    if (!host_is_little_endian()) { /* the bank is little-endian float32; this reader does not swap */
        fprintf(stderr, "this reader needs a little-endian host\n");
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (f == NULL) {
        perror(argv[1]);
        return 2;
    }
    /* the whole file must be the size bank.h states: a bank from another export would read as wrong floats */
    if (fseek(f, 0, SEEK_END) != 0 || (unsigned long long)ftell(f) != BITFIT_BANK_TOTAL_BYTES) {
        fprintf(stderr, "%s is not the bank that bank.h describes (%llu bytes expected): re-export both\n", argv[1],
                (unsigned long long)BITFIT_BANK_TOTAL_BYTES);
        fclose(f);
        return 2;
    }
    /* a task's block: its biases at fixed offsets, the same layout for every task */
    static unsigned char block[BITFIT_BANK_BLOCK_USED_BYTES];
    if (fseek(f, (long)bitfit_task_offsets[task], SEEK_SET) != 0 || fread(block, 1, sizeof block, f) != sizeof block) {
        fprintf(stderr, "%s: short read at task %ld's block\n", argv[1], task);
        fclose(f);
        return 2;
    }
    fclose(f);
    printf("task %ld %s %s\n", task, bitfit_task_names[task], bitfit_task_kinds[task]);
    for (int b = 0; b < BITFIT_BANK_NUM_BIASES; b++) {
        printf("%s %u", bitfit_bias_names[b], (unsigned)bitfit_bias_lengths[b]);
        for (uint32_t i = 0; i < bitfit_bias_lengths[b]; i++) {
            float v;
            memcpy(&v, block + bitfit_bias_offsets[b] + 4u * i, sizeof v); /* offsets are aligned; memcpy anyway */
            printf(" %.9g", (double)v);
        }
        printf("\n");
    }
    return 0;
}
